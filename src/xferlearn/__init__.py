"""xferlearn: transfer learning on a folder of images.

    import xferlearn
    result = xferlearn.train("chest_xray/train", out="runs/cxr")
    model = xferlearn.load("runs/cxr")
    model.predict(["a.jpeg", "b.jpeg"])
    xferlearn.evaluate("runs/cxr", "chest_xray/test")
"""

__version__ = "0.1.0"

# The functions are bound after their modules are imported, so that `xferlearn.train` is
# the function, not the submodule of the same name.
from .backbones import create_model, list_backbones  # noqa: E402
from .checkpoint import load_checkpoint  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .errors import XferlearnError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .predict import Predictor, load  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["XferlearnError", "__version__", "train", "TrainConfig", "evaluate", "load", "Predictor",
           "list_backbones", "create_model", "load_checkpoint"]

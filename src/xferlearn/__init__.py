"""xferlearn: transfer learning on a folder of images.

    import xferlearn
    result = xferlearn.train("chest_xray/train", out="runs/cxr")
    model = xferlearn.load("runs/cxr")
    model.predict(["a.jpeg", "b.jpeg"])
    xferlearn.evaluate("runs/cxr", "chest_xray/test")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): Lightning, timm and scikit-learn take
# seconds to import, and `xferlearn --help` or a prediction from an ONNX export needs none
# of them. No submodule shares a name with a function here, so an attribute is never
# shadowed by a submodule of the same name.
_API = {
    "train": "training", "TrainConfig": "config", "evaluate": "evaluation", "load": "predict",
    "Predictor": "predict", "list_backbones": "backbones", "create_model": "backbones",
    "load_checkpoint": "checkpoint", "XferlearnError": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'xferlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

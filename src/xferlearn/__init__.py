"""xferlearn: transfer learning on a folder of images.

    import xferlearn
    result = xferlearn.train("chest_xray/train", out="runs/cxr")
    model = xferlearn.load("runs/cxr")
    model.predict(["a.jpeg", "b.jpeg"])
    xferlearn.evaluate("runs/cxr", "chest_xray/test")
    xferlearn.export("runs/cxr", "onnx")
    xferlearn.demo()                                   # all of it on the packaged sample
    xferlearn.datasets.chest_xray_sample()             # that sample's folder

The package is laid out by stage of the data flow (ARCHITECTURE.md): data/ -> models/ ->
evaluation/ -> training/ -> deploy/, with api.py and cli.py on top.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): torch, Lightning, timm and scikit-learn
# take seconds to import, and `xferlearn --help` needs none of them. No subpackage shares a
# name with a function here, so an attribute is never shadowed by a submodule.
_API = {
    "train": "api", "load": "api", "evaluate": "api", "predict": "api", "explain": "api", "export": "api",
    "serve": "api", "demo": "api", "calibrate": "api", "stress": "api", "Model": "api", "TrainConfig": "config",
    "Predictor": "models.predictor",
    "list_backbones": "models.backbones", "create_model": "models.backbones",
    "load_checkpoint": "models.checkpoint", "XferlearnError": "errors",
}

# Subpackages reachable as attributes after a plain `import xferlearn`
# (`xferlearn.datasets.chest_xray_sample()`), also imported on first use.
_SUBPACKAGES = ("datasets",)

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)  # importing sets the attribute
    if name not in _API:
        raise AttributeError(f"module 'xferlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_SUBPACKAGES))

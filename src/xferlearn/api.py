"""The public API: one function per command, and a loaded model that does them all.

    import xferlearn
    result = xferlearn.train("chest_xray/train", out="runs/cxr")   # TrainConfig's fields as keywords
    model = xferlearn.load("runs/cxr")                              # a Model (a PyTorch Predictor)
    model.predict(["a.jpeg", "b.jpeg"])
    model.evaluate("chest_xray/test")                               # = xferlearn.evaluate("runs/cxr", ...)
    model.explain("a.jpeg")                                         # Grad-CAM
    model.stress("other_site/")                                     # = xferlearn.stress("runs/cxr", ...)
    model.export("onnx")                                            # = xferlearn.export("runs/cxr", "onnx")
    xferlearn.demo()             # the whole job on the packaged chest X-ray sample (xferlearn.datasets)

In the spirit of fastai's `Learner` and Keras' `Model`: what a run can do is a method of
the loaded model and a function of the package. Each function imports its stage on first
use, so `import xferlearn` stays instant.
"""

from __future__ import annotations

from pathlib import Path

from .models.checkpoint import load_checkpoint
from .models.predictor import Predictor


class Model(Predictor):
    """A trained run, loaded: Predictor's `predict`/`iter_predict`/`probabilities`, plus the
    commands that take a run (`evaluate`, `explain`, `export`) as methods."""

    def __init__(self, run: str | Path, **options):
        super().__init__(load_checkpoint(run), **options)
        self.run = Path(run)

    def evaluate(self, data: str | Path, out: str | Path | None = None, **options) -> dict:
        return evaluate(self.run, data, out, **options)

    def explain(self, item):
        """Grad-CAM for one image (a path, bytes, PIL image or array): an `Explanation`."""
        from .evaluation.explain import explain as explain_one

        return explain_one(self, item)

    def stress(self, data: str | Path | None = None, out: str | Path | None = None, **options) -> dict:
        """The stress test (see `xferlearn.stress`) with this loaded model."""
        return stress(self.run, data, out, predictor=self, **options)

    def export(self, fmt: str = "onnx", out: str | Path | None = None, **options) -> dict[str, Path]:
        return export(self.run, fmt, out, **options)


def load(run: str | Path, **options) -> Model:
    """The trained classifier in a run folder (or checkpoint file); options as `Predictor`'s
    (`device`, `precision`, `tta`, `prevalence`, `compile`, `n_images`, `batch_size`)."""
    return Model(run, **options)


def train(data: str | Path | None = None, config=None, **options):
    """Train on a folder of class folders; `options` are TrainConfig's fields. Returns a TrainResult."""
    from dataclasses import fields
    from difflib import get_close_matches

    from .config import TrainConfig
    from .errors import XferlearnError
    from .training.pipeline import train as run_training

    known = [f.name for f in fields(TrainConfig)]
    for name in options:
        if name not in known:  # as the CLI answers an unknown flag: one line, with the likely one
            near = get_close_matches(name, known, n=1)
            raise XferlearnError(f"train() has no option {name!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                                      "; the options are TrainConfig's fields."))
    if config is None:
        config = TrainConfig(data=str(data), **options) if data is not None else TrainConfig(**options)
    return run_training(config)


def evaluate(run: str | Path, data: str | Path, out: str | Path | None = None, **options) -> dict:
    """metrics.json, report.md and plots for a run on labelled data; returns the metrics."""
    from .evaluation.evaluate import evaluate as run_evaluation

    return run_evaluation(run, data, out, **options)


def stress(run: str | Path, data: str | Path | None = None, out: str | Path | None = None, *,
           engine: str = "auto", **options) -> dict:
    """Re-evaluate a run under acquisition-like shifts (blur, noise, JPEG, exposure...) at several
    severities, at its own threshold; writes stress.json, stress.md and plots into `out`
    (default RUN/stress) and returns the record. `data=None, split="val"`: the run's validation
    images. Options as evaluation.stress.stress's (shifts, severities, limit, batch_size...)."""
    from .evaluation.stress import stress as run_stress

    if engine != "torch" and options.get("predictor") is None:  # a loaded Model stresses itself
        from .deploy.predict import load_engine

        options["predictor"] = load_engine(run, engine)
    return run_stress(run, data, out, **options)


def predict(run: str | Path, items, engine: str = "auto", **options) -> list[dict]:
    """One row per image (paths, folders, bytes, PIL images or arrays) from a run on `engine`."""
    from .data.layout import expand_paths
    from .deploy.predict import load_engine

    items = items if isinstance(items, (list, tuple)) else [items]
    paths = [i for i in items if isinstance(i, (str, Path))]
    items = expand_paths(paths) + [i for i in items if not isinstance(i, (str, Path))]
    options.setdefault("n_images", len(items))
    return load_engine(run, engine, **options).predict(list(items))


def explain(run: str | Path, paths, out: str | Path = ".") -> list[Path]:
    """Grad-CAM PNGs for image files and folders, written into `out`; returns their paths."""
    from .evaluation.explain import explain_files

    return explain_files(run, paths if isinstance(paths, (list, tuple)) else [paths], out)


def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None, **options) -> dict[str, Path]:
    """Export a run as ONNX, int8 ONNX or TorchScript with its model.json sidecar."""
    from .deploy.export import export as run_export

    return run_export(run, fmt, out, **options)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve a run over HTTP (blocks until stopped)."""
    from .deploy.serve import serve as run_service

    run_service(run, host=host, port=port, **options)


def demo(out: str | Path = "xferlearn-demo", *, force: bool = False, **options):
    """Train, evaluate and explain on the packaged chest X-ray sample, leaving a run in `out`
    (refused where `out` holds a model, unless `force`); `options` are TrainConfig's fields.
    Prints the figures and the commands to try next; returns a DemoResult."""
    from .quickstart import demo as run_demo

    return run_demo(out, force=force, **options)


def calibrate(run: str | Path, site_data: str | Path, out: str | Path, **options) -> dict:
    """Re-choose `run`'s temperature and threshold (and with prior=True, its class prior) on a
    labelled sample from a new site; write the result as the new run `out`. Options as
    `training.site.calibrate_site` (prior, threshold, target_sensitivity, n_boot, always_move)."""
    from .training.site import calibrate_site

    return calibrate_site(run, site_data, out, **options)

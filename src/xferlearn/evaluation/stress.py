"""The stress test: a trained run re-evaluated under acquisition-like shifts.

A validation split carved from the training folder shares its hospital, devices and
habits, so it cannot say how a model holds up elsewhere. `stress` takes labelled images
the model was not trained on (a folder, or the run's own validation split: that tunes
nothing, it only measures), shifts them as another site's images might differ
(corruptions.py), and reports for every shift and severity the AUC and the decisions at
the run's own stored threshold, which is never re-tuned here, and how far that operating
point moves (sensitivity and specificity against the clean images).

Each image is decoded once, through the decode cache at the model's input size, and held
in memory (3 x S x S bytes each: about 150 MB per 1000 images at 224 px); the shifts are
applied to those arrays batch by batch and the batches go through the run's predictor.

Summary figures, in the spirit of ImageNet-C's mean corruption error (Hendrycks &
Dietterich, 2019), which normalises by a baseline model's errors; there is no baseline
here, so the figures are absolute and paired with the clean value they rise from:
- `mean_error`: the mean, over every shift and severity, of the error (1 - accuracy) at the
  run's threshold (argmax for more than two classes); `added_error` = mean_error - clean error.
- `mean_auc_loss`: the same mean of 1 - AUC; `added_auc_loss` = it minus the clean 1 - AUC.
- two classes: the mean sensitivity and specificity under shift, and the lowest of each.
- `worst_shifts`: the shifts by their mean error over the severities, worst first.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .._io import read_json
from ..data.contrast import equalize_tensor
from ..data.folders import is_cross_fitted, scan
from ..data.layout import check_outside
from ..data.images import DecodeCache, UnreadableImage
from ..errors import XferlearnError
from ..models.checkpoint import load_checkpoint
from ..rundir import RunDir, as_path
from .corruptions import PARAMETERS, check_choices, corrupt_batch
from .evaluate import evaluation_root
from .metrics import compute_metrics

KEPT = ("auc", "accuracy", "sensitivity", "specificity")


def stress(run: str | Path, data: str | Path | None = None, out: str | Path | None = None, *,
           split: str | None = None, shifts=None, severities=None, limit: int | None = None,
           batch_size: int = 32, cache_dir: str | None = None, precision: str = "fp32",
           predictor=None, progress: bool = True, seed: int = 0) -> dict:
    """Stress-test a run on labelled `data` (or `split="val"`: the run's validation images);
    write stress.json, stress.md and stress.png into `out` (default RUN/stress) and return the record.

    `shifts`/`severities`: subsets of config.STRESS_SHIFTS and 1..5 (default: all); `limit`: at
    most this many images per class, drawn with `seed`; `predictor`: any engine's predictor for
    the run (default: the PyTorch one at `precision`)."""
    from .stress_report import write_stress

    run = Path(run)
    checkpoint = load_checkpoint(run)  # a clear error before anything else when RUN is not a run
    shifts, severities = check_choices(shifts, severities)
    if predictor is None:
        from ..models.predictor import Predictor

        predictor = Predictor(checkpoint, precision=precision)
    pre = checkpoint.preprocessing
    cache = DecodeCache.of(pre, cache_dir)
    root = None if data is None else evaluation_root(as_path(data, "DATA"), checkpoint.classes)
    if out is not None and root is not None:  # before DATA is scanned
        check_outside(out, [root])
    paths, digests, labels, source = _images(run, root, split, checkpoint.classes, cache)
    if out is not None and root is None:  # the validation images' folders: a class of their own there breaks them
        check_outside(out, {Path(path).parent.parent for path in paths})
    paths, digests, labels = _limit(paths, digests, labels, limit, len(checkpoint.classes), seed)
    started = time.perf_counter()
    total = len(paths) * (1 + len(shifts) * len(severities))
    with _progress(progress, total) as advance:
        images = decode_all(paths, digests, cache)
        clean = shifted_probabilities(predictor, images, digests, "clean", 0, batch_size, advance)
        # The engine's own threshold and its source: an int8 model decides at the one chosen for it.
        threshold = predictor.threshold
        rule = predictor.threshold_source
        positive = checkpoint.positive_index
        base = compute_metrics(labels, clean, checkpoint.classes, threshold, rule, positive)
        rows = []
        for shift in shifts:
            for severity in severities:
                probs = shifted_probabilities(predictor, images, digests, shift, severity, batch_size, advance)
                rows.append(_row(shift, severity, compute_metrics(labels, probs, checkpoint.classes, threshold, rule,
                                                                  positive), base))
    record = {
        "run": str(RunDir.of(run).root.resolve()), "data": source, "n": len(labels),
        "n_per_class": base["n_per_class"], "classes": checkpoint.classes,
        "threshold": base["threshold"], "threshold_source": base["threshold_source"],
        "positive_class": base.get("positive_class"), "tta": bool(getattr(predictor, "tta", False)),
        "engine": type(predictor).__name__, "limit": limit, "seed": seed,
        "shifts": {s: {"severities": list(PARAMETERS[s][0]), "parameter": PARAMETERS[s][1]} for s in shifts},
        "clean": {key: base.get(key) for key in KEPT} | _positive_rate(base),
        "results": rows, "summary": summarize(base, rows), "seconds": round(time.perf_counter() - started, 1),
    }
    write_stress(Path(out) if out else RunDir.of(run).stress, record, images[0].permute(1, 2, 0).numpy())
    return record


def _images(run: Path, root: Path | None, split, classes: list[str], cache: DecodeCache):
    """(paths, digests, labels, description) of the images to stress: those of `root`, a folder
    of class folders (evaluation_root), or with `split="val"` the run's validation images."""
    if (root is None) == (split is None):
        raise XferlearnError("give either DATA (a folder of class folders) or --split val (the run's own "
                             "validation images), not both or neither.")
    if split is not None:
        if split != "val":
            raise XferlearnError(f"--split takes val (the run's validation images), not {split!r}.")
        record = read_json(RunDir.of(run).split)
        if isinstance(record, dict) and is_cross_fitted(record):
            raise XferlearnError(f"{run} was cross-fitted: its final model trained on every image, so it has no "
                                 "validation images to stress; pass DATA, labelled images it was not trained on.")
        if not isinstance(record, dict) or not record.get("val"):
            raise XferlearnError(f"{RunDir.of(run).split} is missing or lists no validation images; pass DATA instead.")
        if record.get("classes") != classes:
            raise XferlearnError(f"{RunDir.of(run).split} has classes {record.get('classes')}, "
                                 f"but the model knows {classes}; pass DATA instead.")
        val = record["val"]
        missing = [item["path"] for item in val if not Path(item["path"]).is_file()]
        if missing:
            raise XferlearnError(f"{len(missing)} validation images listed in split.json are gone "
                                 f"(first: {missing[0]}); pass DATA instead.")
        return ([item["path"] for item in val], [item["digest"] for item in val],
                np.array([item["label"] for item in val], dtype=np.int64),
                f"validation split of the run ({len(val)} images listed in split.json: {record.get('how', '')})")
    manifest = scan(root, cache, classes=classes, dedupe=False)
    return manifest.paths, manifest.digests, manifest.labels, str(root.resolve())


def _limit(paths, digests, labels, limit, n_classes, seed):
    if limit is None:
        return paths, digests, labels
    if limit < 1:
        raise XferlearnError(f"--limit is a number of images per class, at least 1; not {limit}.")
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:limit] for k in range(n_classes)]))
    return [paths[i] for i in keep], [digests[i] for i in keep], labels[keep]


def decode_all(paths, digests, cache: DecodeCache) -> torch.Tensor:
    """(N, 3, S, S) uint8: every image decoded once, through the cache."""
    arrays = []
    for path, digest in zip(paths, digests):
        try:
            arrays.append(cache.get(path, digest))
        except UnreadableImage as error:
            raise XferlearnError(f"cannot read {path}: {error}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.inference_mode()
def shifted_probabilities(predictor, images, digests, shift, severity, batch_size=32,
                          advance=lambda n, what: None) -> np.ndarray:
    """(N, C) probabilities of `predictor` on `images` (decode_all's) under `shift` at `severity`."""
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = corrupt_batch(images[start:start + batch_size], digests[start:start + batch_size], shift, severity)
        # The run's contrast step after the shift, as it would meet a shifted device's image.
        batch = equalize_tensor(batch, predictor.preprocessing.contrast)
        chunks.append(predictor.probabilities(batch.contiguous()))
        advance(len(batch), f"{shift} {severity}" if severity else "clean")
    return np.concatenate(chunks)


def _positive_rate(metrics: dict) -> dict:
    """The share of images called positive (two classes): where the operating point sits."""
    matrix = np.asarray(metrics["confusion_matrix"])
    if "positive_class" not in metrics:
        return {}
    pos = metrics["classes"].index(metrics["positive_class"])
    return {"positive_rate": float(matrix[:, pos].sum() / matrix.sum())}


def _row(shift: str, severity: int, metrics: dict, base: dict) -> dict:
    row = {"shift": shift, "severity": severity, "parameter": PARAMETERS[shift][0][severity - 1]}
    row |= {key: metrics.get(key) for key in KEPT} | _positive_rate(metrics)
    for key in ("sensitivity", "specificity"):
        if metrics.get(key) is not None and base.get(key) is not None:
            row[f"delta_{key}"] = metrics[key] - base[key]
    return row


def summarize(base: dict, rows: list[dict]) -> dict:
    """The summary figures defined in the module docstring."""
    clean_error = 1 - base["accuracy"]
    errors = [1 - r["accuracy"] for r in rows]
    auc_losses = [1 - r["auc"] for r in rows if r["auc"] is not None]
    summary = {"clean_error": clean_error, "mean_error": float(np.mean(errors)),
               "added_error": float(np.mean(errors)) - clean_error}
    if auc_losses and base.get("auc") is not None:
        summary |= {"clean_auc_loss": 1 - base["auc"], "mean_auc_loss": float(np.mean(auc_losses)),
                    "added_auc_loss": float(np.mean(auc_losses)) - (1 - base["auc"])}
    if "positive_class" in base:
        for key in ("sensitivity", "specificity"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                summary[f"mean_{key}"], summary[f"min_{key}"] = float(np.mean(values)), float(np.min(values))
    by_shift: dict[str, list[float]] = {}
    for row, error in zip(rows, errors):
        by_shift.setdefault(row["shift"], []).append(error)
    ranked = sorted(by_shift.items(), key=lambda item: -np.mean(item[1]))
    summary["worst_shifts"] = [{"shift": s, "mean_error": float(np.mean(e)), "worst_error": float(np.max(e))}
                               for s, e in ranked]
    return summary


class _progress:
    """A rich progress bar on stderr over every image the test pushes through the model."""

    def __init__(self, show: bool, total: int):
        self.show, self.total = show, total

    def __enter__(self):
        if not self.show:
            return lambda n, what: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("stress: clean", total=self.total)
        return lambda n, what: self.bar.update(task, advance=n, description=f"stress: {what}")

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
        return False

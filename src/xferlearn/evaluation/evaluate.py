"""Evaluation of a trained run on a labelled folder: metrics.json, report.md and plots.

The decision threshold is the one stored in the checkpoint, chosen on the validation
split at training time; evaluation never tunes anything on the data it is given. The
report says which threshold was used and where it came from, whether test-time
augmentation was on (by default: as the threshold was chosen) and whether probabilities
were corrected to a stated prevalence, gives bootstrap 95% intervals, and shows the
metrics at 0.5 only as a secondary line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.folders import ImageDataset, check_same_classes, class_folders, scan
from ..data.images import DecodeCache
from ..models.features import image_loader
from ..models.predictor import Predictor, load_predictor
from ..rundir import RunDir, checkpoint_path
from .metrics import bootstrap_intervals, compute_metrics
from .report import write_report


def evaluation_root(data: Path, classes: list[str]) -> Path:
    """The folder of class folders to evaluate: `data` itself, or the test/ of a Kaggle-style root."""
    found = class_folders(data)
    if found != classes and "test" in found and (data / "test").is_dir():
        data = data / "test"
        found = class_folders(data)
    check_same_classes(classes, found, data)
    return data


def predict_manifest(predictor: Predictor, manifest, cache: DecodeCache, batch_size: int = 32) -> np.ndarray:
    """(N, C) probabilities for every image of a manifest, decoded through the cache."""
    dataset = ImageDataset(manifest.paths, manifest.digests, None, cache)
    batches = [predictor.probabilities(images) for images, _ in image_loader(dataset, batch_size)]
    return np.concatenate(batches) if batches else np.zeros((0, len(predictor.classes)))


def evaluate(run: str | Path, data: str | Path, out: str | Path | None = None, *, batch_size: int = 32,
             n_boot: int = 1000, cache_dir: str | None = None, precision: str = "fp32",
             gallery: bool = True, tta: bool | None = None, prevalence: float | None = None) -> dict:
    """Evaluate the run's model on `data` and write the report into `out` (default: the run folder).

    With `gallery` (two classes only), the report shows the most confident false positives and
    false negatives with their Grad-CAM heatmaps. `tta` (None: as the threshold was chosen)
    and `prevalence` (the positive share to correct probabilities to) are Predictor's."""
    with RunDir.of(run).lock_writes_to(out, "evaluate"):
        return _evaluate(Path(run), data, out, batch_size=batch_size, n_boot=n_boot, cache_dir=cache_dir,
                         precision=precision, gallery=gallery, tta=tta, prevalence=prevalence)


def _evaluate(run: Path, data, out, *, batch_size, n_boot, cache_dir, precision, gallery, tta, prevalence) -> dict:
    predictor = load_predictor(run, precision=precision, tta=tta, prevalence=prevalence)
    root = evaluation_root(Path(data), predictor.classes)
    pre = predictor.preprocessing
    cache = DecodeCache(cache_dir, pre.input_size, pre.interpolation)
    manifest = scan(root, cache, classes=predictor.classes, dedupe=False)
    with torch.inference_mode():
        probs = predict_manifest(predictor, manifest, cache, batch_size)
    labels = manifest.labels
    checkpoint = predictor.checkpoint
    source = checkpoint.threshold_source
    if predictor.prevalence is not None and predictor.threshold is not None:
        source += f"; mapped from {checkpoint.threshold:.4g} for a stated prevalence of {predictor.prevalence:g}"
    metrics = compute_metrics(labels, probs, predictor.classes, predictor.threshold, source)
    metrics["tta"], metrics["prevalence"] = predictor.tta, predictor.prevalence
    intervals = bootstrap_intervals(labels, probs, predictor.classes, predictor.threshold, n_boot=n_boot)
    metrics["unreadable"] = [{"file": path, "reason": reason} for path, reason in manifest.unreadable]
    rundir = RunDir.of(run)
    run_info = {"run": str(rundir.root.resolve()), "data": str(root.resolve()), "backbone": checkpoint.backbone,
                "weights": checkpoint.weights, "checkpoint": str(checkpoint_path(run).resolve()),
                "temperature": round(checkpoint.temperature, 4), "test-time augmentation": predictor.tta,
                "prevalence": predictor.prevalence or "as trained"}
    history = rundir.history()
    out_dir = Path(out) if out else rundir.root
    gallery_section = None
    if gallery:
        from .explain import error_gallery  # here: Grad-CAM and OpenCV load only when a gallery is drawn

        gallery_section = error_gallery(predictor, manifest.paths, labels, probs, out_dir)
    operating_point = "## Operating point\n\n" + predictor.describe_operating_point()
    write_report(out_dir, metrics, labels, probs, predictor.classes, title="xferlearn evaluation",
                 run_info=run_info, history_csv=history, intervals=intervals,
                 extra_sections=[operating_point] + ([gallery_section] if gallery_section else []))
    metrics["intervals"] = intervals
    return metrics

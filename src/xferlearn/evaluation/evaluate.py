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

from .._io import read_json
from ..errors import XferlearnError
from ..data.folders import ImageDataset, from_validation_folder, is_cross_fitted, scan
from ..data.layout import check_outside, check_same_classes, class_folders
from ..data.images import DecodeCache, progress_bar
from ..models.features import image_loader
from ..models.predictor import Predictor, load_predictor
from ..rundir import RunDir, as_path, checkpoint_path
from ..data.phash import hashes
from .leaks import calibration_sample, describe_overlap, find_overlap, load_split, refuse_overlap
from .metrics import bootstrap_intervals, compute_metrics
from .report import write_report
from .stress_report import stress_section


def evaluation_root(data: Path, classes: list[str]) -> Path:
    """The folder of class folders to evaluate: `data` itself, or the test/ of a Kaggle-style root."""
    found = class_folders(data)
    if found != classes and "test" in found and (data / "test").is_dir():
        data = data / "test"
        found = class_folders(data)
    if found != classes:  # a root without test/ (TensorFlow's train/ + validation/): name what would do
        fits = [name for name in found if class_folders(data / name) == classes]
        if fits:
            raise XferlearnError(f"{data} holds {', '.join(f'{name}/' for name in fits)} with the model's classes "
                                 f"{classes} but no test/: give the folder to evaluate, e.g. {data / fits[-1]}.")
    check_same_classes(classes, found, data)
    return data


def predict_manifest(predictor: Predictor, manifest, cache: DecodeCache, batch_size: int = 32) -> np.ndarray:
    """(N, C) probabilities for every image of a manifest, decoded through the cache."""
    dataset = ImageDataset(manifest.paths, manifest.digests, None, cache)
    loader = image_loader(dataset, batch_size)
    batches = [predictor.probabilities(images) for images, _ in progress_bar(loader, len(loader), "predicting",
                                                                            quiet_below=2)]
    return np.concatenate(batches) if batches else np.zeros((0, len(predictor.classes)))


def validation_section(rundir: RunDir, point) -> str:
    """What the run's validation was (a split carved from the training folder, a validation
    folder, or out-of-fold predictions), where the threshold came from (`point`, the run's
    OperatingPoint: validation, or a site sample), and what neither can show."""
    split = read_json(rundir.split)
    split = split if isinstance(split, dict) else {}
    how, n = split.get("how", "not recorded"), len(split.get("val") or [])
    if not split:
        where = "not recorded (the run has no split.json)"
    elif is_cross_fitted(split):
        where = f"out-of-fold predictions of the training images themselves ({how})"
    elif from_validation_folder(how):
        where = f"{n} images of {how}"
    else:
        where = f"{n} images carved from the training folder ({how})"
    threshold = ("The training-time figures come from the run's validation: "
                 f"{where}. The threshold does not: it was re-chosen by {point.describe()}. "
                 if point.when == "calibrate" else
                 f"The threshold and the training-time figures come from the run's validation: {where}. ")
    return ("## What validation was, and what it cannot show\n\n" + threshold +
            "That validation is in-distribution: the same source, devices and habits as the training images. It "
            "cannot show how the model holds up on images from other sites or devices, and neither can the "
            "figures above unless the data evaluated comes from elsewhere. `xferlearn stress` measures how far "
            "acquisition-like shifts move the model; only labelled images from a new site measure it there.")


def evaluate(run: str | Path, data: str | Path, out: str | Path | None = None, *, batch_size: int = 32,
             n_boot: int = 1000, cache_dir: str | None = None, precision: str = "fp32",
             gallery: bool = True, tta: bool | None = None, prevalence: float | None = None,
             strict: bool = False) -> dict:
    """Evaluate the run's model on `data` and write the report into `out` (default: the run folder).

    With `gallery` (two classes only), the report shows the most confident false positives and
    false negatives with their Grad-CAM heatmaps. `tta` (None: as the threshold was chosen)
    and `prevalence` (the positive share to correct probabilities to) are Predictor's. The
    images are matched against the run's training and validation images (leaks.py): the
    count is in the metrics and the report, and `strict` refuses any overlap."""
    with RunDir.of(run).lock_writes_to(out, "evaluate"):
        return _evaluate(Path(run), data, out, batch_size=batch_size, n_boot=n_boot, cache_dir=cache_dir,
                         precision=precision, gallery=gallery, tta=tta, prevalence=prevalence, strict=strict)


def _evaluate(run: Path, data, out, *, batch_size, n_boot, cache_dir, precision, gallery, tta, prevalence,
              strict) -> dict:
    predictor = load_predictor(run, precision=precision, tta=tta, prevalence=prevalence)
    root = evaluation_root(as_path(data, "DATA"), predictor.classes)
    if out is not None:
        check_outside(out, [root])
    pre = predictor.preprocessing
    cache = DecodeCache.of(pre, cache_dir)
    manifest = scan(root, cache, classes=predictor.classes, dedupe=False)
    rundir = RunDir.of(run)
    overlap = find_overlap(load_split(rundir.split), manifest.digests, hashes(manifest.paths, manifest.digests, cache),
                           calibration_sample(rundir.calibration))
    if strict:
        refuse_overlap(overlap)
    with torch.inference_mode():
        probs = predict_manifest(predictor, manifest, cache, batch_size)
    labels = manifest.labels
    checkpoint = predictor.checkpoint
    source = checkpoint.threshold_source
    if predictor.prevalence is not None and predictor.threshold is not None:
        source += f"; mapped from {checkpoint.threshold:.4g} for a stated prevalence of {predictor.prevalence:g}"
    positive = checkpoint.positive_index
    metrics = compute_metrics(labels, probs, predictor.classes, predictor.threshold, source, positive)
    metrics["tta"], metrics["prevalence"] = predictor.tta, predictor.prevalence
    intervals = bootstrap_intervals(labels, probs, predictor.classes, predictor.threshold, n_boot=n_boot,
                                    positive=positive)
    metrics["overlap"] = {**overlap, "summary": describe_overlap(overlap)}
    metrics["unreadable"] = [{"file": path, "reason": reason} for path, reason in manifest.unreadable]
    run_info = {"run": str(rundir.root.resolve()), "data": str(root.resolve()), "backbone": checkpoint.backbone,
                "weights": checkpoint.weights, "checkpoint": str(checkpoint_path(run).resolve()),
                "contrast step": checkpoint.preprocessing.contrast,
                "engine": f"PyTorch {predictor.precision}, at the checkpoint's threshold (an int8 export, where one "
                          "was kept, decides at its own: RUN/export/model.json)",
                "temperature": round(checkpoint.temperature, 4), "test-time augmentation": predictor.tta,
                "prevalence": predictor.prevalence or "as trained"}
    history = rundir.history()
    out_dir = Path(out) if out else rundir.root
    gallery_section = None
    if gallery:
        from .explain import error_gallery  # here: Grad-CAM and OpenCV load only when a gallery is drawn

        gallery_section = error_gallery(predictor, manifest.paths, labels, probs, out_dir)
    operating_point = "## Operating point\n\n" + predictor.describe_operating_point()
    leak = "## Overlap with the run's images\n\n" + metrics["overlap"]["summary"] + (
        " (identical files by content hash; near copies, re-encoded or resized, by a perceptual hash)"
        if overlap.get("checked") else "")
    sections = [leak, operating_point, training_figures(checkpoint.metrics),
                validation_section(rundir, checkpoint.operating_point),
                stress_section(rundir.root), gallery_section]
    write_report(out_dir, metrics, labels, probs, predictor.classes, title="xferlearn evaluation",
                 run_info=run_info, history_csv=history, intervals=intervals,
                 extra_sections=[section for section in sections if section])
    metrics["intervals"] = intervals
    return metrics


def training_figures(metrics: dict) -> str | None:
    """The figures the operating point was chosen on at training time (a held-out split, a
    validation folder or out-of-fold predictions), with their intervals where stored."""
    if not metrics or metrics.get("auc") is None:
        return None
    intervals = metrics.get("intervals") or {}

    def cell(name):
        value, interval = metrics.get(name), intervals.get(name)
        if value is None:
            return "undefined"
        return f"{value:.4f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    rows = "\n".join(f"| {name} | {cell(name)} |" for name in ("auc", "accuracy", "sensitivity", "specificity"))
    where = metrics.get("validation") or metrics.get("threshold_source", "")
    return (f"## At training time (what the operating point was chosen on)\n\n{where}; n {metrics.get('n')}, "
            f"95% bootstrap intervals.\n\n| metric | value |\n|---|---|\n{rows}")

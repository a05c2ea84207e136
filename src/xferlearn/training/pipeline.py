"""`train()`: the whole job, from a folder to a checkpoint.

1. build the backbone (a clear error now beats one after an hour of decoding);
2. scan the folder, carve a patient-disjoint validation split, save it with the run;
3. fit with a recipe: `linear` (linear.py, the article's: frozen base, new softmax head, on
   features computed once per image and view), or `finetune` (finetune.py: that head,
   then the network unfrozen in stages);
4. choose the operating point on validation alone (calibration.py) and write a
   self-describing checkpoint, with the class prior the probabilities refer to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from .._io import file_sha256, os_error, write_json
from ..config import TrainConfig
from ..data.folders import find_layout, save_split, scan, split_validation
from ..data.images import DecodeCache
from ..errors import XferlearnError
from ..evaluation.metrics import positive_index
from ..models.backbones import create_model, resolve
from ..models.checkpoint import Checkpoint, OperatingPoint, save_checkpoint
from ..rundir import RunDir
from .calibration import calibrate, write_validation_predictions
from .checkpoints import begin_attempt, run_identity
from .finetune import finetune
from .linear import effective_prior, fit_head
from .loop import console


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict            # validation metrics at the chosen threshold
    seconds: float


def prepare_run(config: TrainConfig) -> RunDir:
    run = RunDir(config.out)
    if run.checkpoint.exists() and not config.resume:
        raise XferlearnError(f"{run.root} already holds a trained model; choose another --out, or pass --resume "
                             "to continue that run.")
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise os_error(run.root, error, "create") from None
    return run


def train(config: TrainConfig | None = None, **options) -> TrainResult:
    """Train a classifier on a folder of class folders; see TrainConfig for the options."""
    config = config or TrainConfig(**options)
    started = time.perf_counter()
    L.seed_everything(config.seed, verbose=False)
    layout = find_layout(config.data)
    model, preprocessing, weights_tag = create_model(config.backbone, config.weights, len(layout.classes),
                                                     config.image_size)
    arch = resolve(config.backbone)
    with RunDir(config.out).lock("train"):  # one writer per run folder, for the whole command
        return _train(config, model, preprocessing, weights_tag, arch, layout, started)


def _train(config: TrainConfig, model, preprocessing, weights_tag: str, arch: str, layout, started: float):
    run = prepare_run(config)
    config.save(run.config)

    cache = DecodeCache(config.cache_dir, preprocessing.input_size, preprocessing.interpolation)
    manifest = scan(layout.train_roots, cache)
    console.print(f"Scanned {len(manifest.samples)} images in {len(manifest.classes)} classes {manifest.counts()}; "
                  f"{len(manifest.duplicates)} exact duplicates kept once, {len(manifest.unreadable)} unreadable.")
    for path, reason in manifest.unreadable:
        console.print(f"  unreadable: {path}: {reason}", highlight=False)
    train_idx, val_idx, how = split_validation(manifest, config.val_fraction, config.seed)
    save_split(run.split, manifest, train_idx, val_idx, how)
    console.print(f"Validation split: {len(val_idx)} images ({how}).")
    begin_attempt(run, run_identity(config.to_dict(), manifest, train_idx, val_idx), config.resume, console.print)

    if config.recipe == "finetune":
        selection = finetune(model, manifest, train_idx, val_idx, config, arch, weights_tag, preprocessing, cache,
                             run.root)
        val_logits = None
    else:
        selection, val_logits, _ = fit_head(model, manifest, train_idx, val_idx, config, arch, weights_tag,
                                            preprocessing, cache, run.root)
    checkpoint = Checkpoint(arch=arch, backbone=config.backbone, weights=weights_tag,
                            preprocessing=preprocessing, classes=manifest.classes,
                            positive_index=positive_index(manifest.classes) if len(manifest.classes) == 2 else None,
                            operating_point=OperatingPoint("argmax"), state_dict=model.state_dict(),
                            config=config.to_dict(), tta=config.tta, image_size=config.image_size,
                            class_prior=effective_prior(manifest.labels[train_idx], len(manifest.classes), config),
                            split_sha256=file_sha256(run.split))
    val_probs = calibrate(checkpoint, manifest, val_idx, cache, config, val_logits)
    metrics = checkpoint.metrics
    metrics["selection"] = selection
    write_validation_predictions(run.validation_predictions, manifest, val_idx, val_probs)
    path = save_checkpoint(checkpoint, run.checkpoint)
    threshold, source = checkpoint.threshold, checkpoint.threshold_source
    seconds = time.perf_counter() - started
    write_json(run.validation_metrics, metrics)
    console.print(f"Validation: AUC {metrics['auc']:.4f}, accuracy {metrics['accuracy']:.4f}, "
                  f"sensitivity {metrics['sensitivity']:.4f}, specificity {metrics['specificity']:.4f} "
                  f"at threshold {threshold if threshold is None else round(threshold, 4)} ({source}). "
                  f"{seconds:.0f} s. Checkpoint: {path}")
    return TrainResult(run.root, path, metrics, seconds)

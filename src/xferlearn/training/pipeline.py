"""`train()`: the whole job, from a folder to a checkpoint.

1. tell grayscale from colour on a sample of the images (it decides the linear recipe's networks,
   the input size, the contrast step and the default views), and build the backbone (a clear
   error now beats one after an hour of decoding);
2. scan the folder and decide the validation: a provided validation folder large enough to
   choose on; else, on small data, K-fold cross-fitting (crossfit.py); else a held-out split,
   grouped by patient where file names carry one; save it with the run (with image hashes);
3. fit with a recipe: `linear` (linear.py, the article's: frozen base, new softmax head, on
   features computed once per image and view), or `finetune` (finetune.py: that head,
   then the network unfrozen in stages);
4. choose the operating point on validation alone (calibration.py) and write a
   self-describing checkpoint, with the class prior the probabilities refer to.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np

from .._io import file_sha256, os_error, write_json
from ..config import TrainConfig
from ..config import CV_BELOW_PER_CLASS, CV_FOLDS, MIN_VAL_PER_CLASS
from ..data.folders import (VALIDATION_FOLDER, Manifest, folder_split, from_validation_folder, grouping, save_split,
                            scan, split_validation)
from ..data.layout import check_outside, count_images, find_layout, training_files, use_validation_folder
from ..data.phash import hashes, near_matches
from ..data.contrast import is_grayscale_folder, resolve_contrast
from ..data.images import DecodeCache
from ..errors import XferlearnError
from ..evaluation.metrics import bootstrap_intervals, decision_rule, named_positive_index
from ..models.backbones import create_model, is_packaged, resolve
from ..models.checkpoint import Checkpoint, OperatingPoint, save_checkpoint
from ..rundir import RunDir
from .calibration import calibrate, write_validation_predictions
from .crossfit import crossfit_head, crossfit_operating_point
from .distributed import barrier, is_rank_zero, launch
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


def choose_folds(config: TrainConfig, manifest: Manifest) -> int:
    """0: choose on a held-out split; K: on K-fold out-of-fold predictions. Automatic unless
    --cv K / --no-cv: cross-fitting when the held-out split would leave its smallest class
    fewer than CV_BELOW_PER_CLASS images, for the linear recipe (the only one it is built for)."""
    supported = config.recipe == "linear" and not config.tta
    if config.cv is not None:
        if config.cv and not supported:
            raise XferlearnError("--cv works with --recipe linear without --tta; the finetune recipe and --tta "
                                 "choose on a held-out split (pass --no-cv or leave --cv out).")
        if not config.cv:
            console.print("Cross-fitting off (--no-cv): choosing on a held-out split.")
        return config.cv
    counts = manifest.counts()
    smallest = min(counts, key=counts.get)
    expected = int(counts[smallest] * config.val_fraction)
    if expected >= CV_BELOW_PER_CLASS:
        return 0
    if not supported:
        console.print(f"Small data: a held-out split would hold about {expected} {smallest} images, but "
                      f"{'--tta' if config.tta else 'the finetune recipe'} chooses on a held-out split "
                      "(cross-fitting is built for the linear recipe only).")
        return 0
    console.print(f"Small data: a held-out split would hold about {expected} {smallest} images (fewer than "
                  f"{CV_BELOW_PER_CLASS}), so epochs, temperature and threshold are chosen by {CV_FOLDS}-fold "
                  "cross-fitting and the head is trained on every image (--no-cv to hold a split out).")
    return CV_FOLDS


def split(config: TrainConfig, layout, cache: DecodeCache):
    """Scan the images and decide the validation: the provided folder, a held-out split, or
    cross-fitting (K > 0). Returns the manifest, train and validation indices, how, and K."""
    roots, use_folder = list(layout.train_roots), False
    if layout.val_root is not None:
        use_folder, why = use_validation_folder(count_images(layout.val_root, layout.classes), MIN_VAL_PER_CLASS)
        if use_folder and config.cv:
            use_folder, why = False, f"--cv {config.cv} asks for cross-fitting over every image"
        roots.append(layout.val_root)
    manifest = scan(roots, cache)
    console.print(f"Scanned {len(manifest.samples)} images in {len(manifest.classes)} classes {manifest.counts()}; "
                  f"{len(manifest.duplicates)} exact duplicates kept once, {len(manifest.unreadable)} unreadable.")
    for path, reason in manifest.unreadable:
        console.print(f"  unreadable: {path}: {reason}", highlight=False)
    if use_folder:
        train_idx, val_idx = folder_split(manifest, layout.val_root, MIN_VAL_PER_CLASS)
        how = f"{VALIDATION_FOLDER} {layout.val_root}: {why}"
        console.print(f"Validation: {layout.val_root} ({len(val_idx)} images), as {why}.", highlight=False)
        patients = [{manifest.samples[i].patient for i in side} - {None} for side in (train_idx, val_idx)]
        if shared := sorted(patients[0] & patients[1]):  # the folder is the user's split: said, not changed
            console.print(f"Warning: {len(shared)} patients have images on both sides (e.g. {shared[0]}); the "
                          "validation figures are optimistic for them.", highlight=False)
        return manifest, train_idx, val_idx, how, 0
    if layout.val_root is not None:
        console.print(f"Validation folder {layout.val_root} pooled into train: {why}.", highlight=False)
    grouped = bool(config.group_by or config.groups)  # whole groups held out: the signal the user asked for
    k = 0 if grouped else choose_folds(config, manifest)  # --cv with groups is refused (config.py)
    if k:
        everything = np.arange(len(manifest.samples))
        return manifest, everything, everything[:0], f"{k}-fold cross-fitting over every image, " \
            f"stratified by class, {grouping(manifest)}, seed {config.split_random_state}", k
    train_idx, val_idx, how = split_validation(manifest, config.val_fraction, config.split_random_state,
                                               group_by=config.group_by, groups_csv=config.groups,
                                               val_groups=config.val_group_list())
    console.print(f"Validation split: {len(val_idx)} images ({how}).")
    return manifest, train_idx, val_idx, how, 0


def choose_for_images(config: TrainConfig, grayscale: bool, cache: DecodeCache, preprocessing):
    """What depends on whether the images are grayscale, besides the input size (train_here): the
    contrast step (`--contrast auto`: CLAHE for grayscale) and the linear recipe's default views
    (sensor-noise views for grayscale). Returns the preprocessing with its contrast step resolved,
    sets the cache to apply it and fills in `config.views` and `config.augment`."""
    contrast = resolve_contrast(config.contrast, grayscale)
    if config.contrast == "auto":
        console.print("Contrast: CLAHE (local equalisation), as the images are grayscale (--contrast none: off)."
                      if contrast == "clahe" else "Contrast: as decoded (colour images; --contrast clahe: equalise).")
    chosen = config.resolve_augmentation(grayscale)
    if chosen and config.recipe == "linear":
        console.print(f"Views: the clean image, and one with sensor noise for {config.views:.0%} of the training "
                      "images, as the images are grayscale (a head on frozen features otherwise reads noise as "
                      "structure; --views 0: clean only).")
    elif chosen:
        console.print("Augmentation: erase (xray's, and a random patch blacked out in half the views), as the images "
                      "are grayscale: no corner, burnt-in marker or edge can carry the call (--augment xray: without).")
    cache.contrast = contrast
    return replace(preprocessing, contrast=contrast)


def train(config: TrainConfig | None = None, **options) -> TrainResult:
    """Train a classifier on a folder of class folders; see TrainConfig for the options. With
    several processes (--devices, --num-nodes) every one of them runs `train_here`."""
    return launch(train_here, config or TrainConfig(**options))


def train_here(config: TrainConfig) -> TrainResult:
    """The whole job in this process (one of the run's processes); only rank 0 writes run files."""
    started = time.perf_counter()
    console.quiet = console.quiet or not is_rank_zero()
    L.seed_everything(config.seed, verbose=False)
    layout = find_layout(config.data, config.val)
    check_outside(config.out, [config.data, layout.val_root])  # the training roots lie inside DATA
    positive = named_positive_index(layout.classes, config.positive_class)
    if positive is None and config.threshold != "youden":
        raise XferlearnError(f"--threshold {config.threshold} applies to two classes; these data have "
                             f"{len(layout.classes)}, and the most probable class decides.")
    grayscale = is_grayscale_folder(training_files(layout))
    if config.resolve_backbone(grayscale):
        console.print(f"Networks: {config.backbone}, as the images are in colour (no measurement told them from the "
                      "three Lites on photographs, and they take 0.7 of the time; --backbone to choose).")
    arch = resolve(config.backbone)
    if config.resolve_image_size(grayscale, is_packaged(arch)):
        console.print(f"Input size: {config.image_size} px, as the images are in colour (the networks' features "
                      "describe a photograph better above their own 224-260 px; --image-size to choose).")
    pool = config.pooling(is_packaged(arch))
    model, preprocessing, weights_tag = create_model(config.backbone, config.weights, len(layout.classes),
                                                     config.image_size, pool)
    # One writer per run folder for the whole command: rank 0 holds the lock for its processes.
    with RunDir(config.out).lock("train") if is_rank_zero() else nullcontext():
        return _train(config, model, preprocessing, weights_tag, arch, layout, positive, grayscale, started, pool)


def warn_near_copies(manifest: Manifest, train_idx, val_idx, phashes: list[str]) -> None:
    """A validation folder's re-encoded or resized copies of training images (perceptual hash, as
    `evaluate`'s leak guard finds them): exact copies were kept on the training side already."""
    near = near_matches([phashes[i] for i in val_idx], [phashes[i] for i in train_idx])
    if count := sum(bool(match) for match in near):
        console.print(f"Warning: {count} validation images are near copies of training images (re-encoded or "
                      "resized); the validation figures and the threshold are optimistic for them.", highlight=False)


def _train(config: TrainConfig, model, preprocessing, weights_tag: str, arch: str, layout, positive: int | None,
           grayscale: bool, started: float, pool: str | None) -> TrainResult:
    run = prepare_run(config)
    barrier()  # every process has checked for a finished run before rank 0 may write one
    cache = DecodeCache.of(preprocessing, config.cache_dir)
    if not is_rank_zero():
        barrier()  # rank 0 decodes into the shared cache first; the others then only read and hash
    manifest, train_idx, val_idx, how, folds = split(config, layout, cache)
    preprocessing = choose_for_images(config, grayscale, cache, preprocessing)
    if is_rank_zero():
        barrier()
        phashes = hashes(manifest.paths, manifest.digests, cache)
        if from_validation_folder(how):
            warn_near_copies(manifest, train_idx, val_idx, phashes)
        # What this run is, before anything is written: an earlier attempt's checkpoints are cleared,
        # or another run's refused under --resume (its config.json and split.json left as they are).
        begin_attempt(run, run_identity(config.to_dict(), manifest, train_idx, val_idx), config.resume, console.print)
        config.save(run.config)  # with what the images decided (views, augmentation)
        save_split(run.split, manifest, train_idx, val_idx, how, phashes)
    barrier()

    val_logits = None
    if folds:
        selection, oof_logits = crossfit_head(model, manifest, config, arch, weights_tag, preprocessing, run.root,
                                              folds, positive)
    elif config.recipe == "finetune":
        selection = finetune(model, manifest, train_idx, val_idx, config, arch, weights_tag, preprocessing, cache,
                             run.root)
    else:
        selection, val_logits, _ = fit_head(model, manifest, train_idx, val_idx, config, arch, weights_tag,
                                            preprocessing, cache, run.root, positive=positive)
    checkpoint = Checkpoint(arch=arch, backbone=config.backbone, weights=weights_tag,
                            preprocessing=preprocessing, classes=manifest.classes, positive_index=positive,
                            operating_point=OperatingPoint("argmax"), state_dict=model.state_dict(),
                            config=config.to_dict(), tta=config.tta, image_size=config.image_size,
                            pool=pool,
                            class_prior=effective_prior(manifest.labels[train_idx], len(manifest.classes), config),
                            split_sha256=file_sha256(run.split) if is_rank_zero() else None)
    if folds:
        (checkpoint.temperature, checkpoint.operating_point, checkpoint.metrics,
         val_probs) = crossfit_operating_point(oof_logits, manifest, positive, config, folds)
        val_idx = train_idx  # every image's out-of-fold prediction
    else:
        where = "validation folder" if from_validation_folder(how) else "validation split"
        val_probs = calibrate(checkpoint, manifest, val_idx, cache, config, val_logits, where)
        checkpoint.metrics["intervals"] = bootstrap_intervals(manifest.labels[val_idx], val_probs, manifest.classes,
                                                              checkpoint.threshold, positive=positive)
        checkpoint.metrics["validation"] = how
    metrics = checkpoint.metrics
    metrics["selection"] = selection
    path = run.checkpoint
    if is_rank_zero():
        write_validation_predictions(run.validation_predictions, manifest, val_idx, val_probs)
        path = save_checkpoint(checkpoint, run.checkpoint)
        write_json(run.validation_metrics, metrics)
    threshold, source = checkpoint.threshold, checkpoint.threshold_source
    seconds = time.perf_counter() - started
    console.print(f"{'Cross-validated' if folds else 'Validation'} (n {metrics['n']}, 95% intervals): "
                  + ", ".join(f"{name} {figure(metrics, name)}" for name in ("auc", "accuracy", "sensitivity",
                                                                            "specificity"))
                  + f" at {decision_rule(threshold, source, checkpoint.positive_class)}. {seconds:.0f} s. Checkpoint: "
                  f"{path}", highlight=False)
    # A cross-fitted run's final model trained on every image: none is left apart to stress.
    stress = (f"`xferlearn stress {run.root} DATA` (DATA: labelled images it was not trained on)" if folds
              else f"`xferlearn stress {run.root} --split val`")
    console.print(f"These {'cross-validated' if folds else 'validation'} figures are in-distribution: "
                  f"{metrics['n']} images from {layout.val_root if from_validation_folder(how) else config.data}, "
                  "the same source as the training images. They "
                  f"cannot show how the model holds up on other sites or devices: run {stress} for "
                  "acquisition-like shifts, and evaluate on labelled images from elsewhere.", highlight=False)
    return TrainResult(run.root, path, metrics, seconds)


def figure(metrics: dict, name: str) -> str:
    """`0.9512 [0.92, 0.98]`: a metric with its bootstrap interval where there is one."""
    value, interval = metrics.get(name), (metrics.get("intervals") or {}).get(name)
    if value is None:
        return "undefined"
    return f"{value:.4f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval and None not in interval else "")

"""Small data done right: choose on out-of-fold predictions, then train on every image.

With a few hundred images, a held-out fifth is too small to choose a threshold on (its
smallest class would hold a few dozen images) and withholds a fifth of the data from the
model. Instead, for the linear recipe, the data are split into K folds (stratified by
class; grouped by patient where file names carry one, so one patient's images never sit
on both sides); a head is trained on each K-1 folds and scored, every epoch, on the fold it
did not see. Those out-of-fold predictions cover every image once: the epoch count is
chosen on them (best AUC, ties to the lower log loss), and the temperature and the
threshold at that epoch. The head is then refitted on every image for that many epochs,
on the same schedule. Features are computed once (the feature store), so the K extra fits
of a linear layer cost seconds.

An ensemble's members are cross-fitted one by one but keep the full `--epochs` (as they do
with a held-out split, training/linear.py): the temperature and threshold come from the mean
of their out-of-fold logits at the last epoch. Choosing each member's count on its own
out-of-fold AUC ranked held-out images no better: on 15 subsets of 240 and 480 chest X-rays
cross-fitted, judged on the 1307 of the sharpness-conflict split, the last epoch read +0.0007
AUC on average, ahead or level in 11 (benchmarks/crossfit_epochs.py; RESULTS.md, session 13).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.progress import Progress
from scipy.special import log_softmax

from ..config import TrainConfig
from ..data.images import DecodeCache
from ..data.folders import Manifest, groups, grouping
from ..errors import XferlearnError
from ..evaluation.metrics import bootstrap_intervals
from .calibration import operating_point
from ..models.ensemble import Ensemble
from .linear import compute_features, per_member, train_head
from .loop import console


def fold_indices(manifest: Manifest, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, held-out) index pairs, stratified by class and grouped (patients, else images)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = manifest.labels
    if np.bincount(labels).min() < k:
        raise XferlearnError(f"Too few images for {k}-fold cross-fitting: each class needs at least {k} "
                             f"(have {manifest.counts()}); pass a smaller --cv.")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups(manifest)))


def choose_epoch(logits_by_epoch: np.ndarray, y: np.ndarray, positive: int | None) -> tuple[int, list[float]]:
    """The epoch (0-based) whose out-of-fold logits rank best (AUC; ties to the lower log loss)."""
    from sklearn.metrics import roc_auc_score
    from scipy.special import softmax

    aucs, losses = [], []
    for logits in logits_by_epoch:
        probs = softmax(logits, axis=1)
        if positive is not None:
            auc = roc_auc_score(y == positive, probs[:, positive])
        else:
            auc = roc_auc_score(y, probs, multi_class="ovr", labels=list(range(probs.shape[1])))
        aucs.append(float(auc))
        losses.append(float(-log_softmax(logits, axis=1)[np.arange(len(y)), y].mean()))
    best = max(range(len(aucs)), key=lambda e: (round(aucs[e], 6), -losses[e]))
    return best, aucs


def crossfit_head(model, manifest: Manifest, config: TrainConfig, arch: str, weights_tag: str, preprocessing,
                  run: Path, k: int, positive: int | None, stage: str = "",
                  keep: str = "best") -> tuple[dict, np.ndarray]:
    """Cross-fit the linear head on every image of `manifest`; refit it on all of them for the
    epoch count with the best out-of-fold AUC (`keep="last"`: all `config.epochs`). An ensemble
    cross-fits each member's head, each keeping its last epoch; its out-of-fold logits are their mean.

    Returns the selection record and the out-of-fold logits at the kept epoch (N, C)."""
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', not {keep!r}")
    if isinstance(model, Ensemble):
        fits = per_member(crossfit_head, model, arch, stage, manifest, config, preprocessing=preprocessing,
                          run=run, k=k, positive=positive, keep="last")
        return {"members": [selection for selection, _ in fits]}, np.mean([oof for _, oof in fits], 0)
    everything = np.arange(len(manifest.samples))
    cache = DecodeCache.of(preprocessing, config.cache_dir)
    tables, _ = compute_features(model, manifest, everything, everything[:0], config, arch, weights_tag,
                                 preprocessing, cache, scored_training=True)
    # Small data: every view's rows in memory, with the images each covers (all, or a share).
    train_views = [(idx, table.read(np.arange(len(table)))) for idx, table in tables]
    labels, clean = manifest.labels, train_views[0][1]

    def rows_of(images):
        """The training rows of `images`, view after view in their order, and their labels."""
        rows, ys = [], []
        for idx, x in train_views:
            where = np.full(len(labels), -1)  # image -> its row in this view's table (-1: not covered)
            where[idx] = np.arange(len(idx))
            picked = where[images]
            picked = picked[picked >= 0]
            rows, ys = rows + [x[picked]], ys + [labels[idx[picked]]]
        return np.concatenate(rows), np.concatenate(ys)

    oof = np.zeros((config.epochs, len(labels), len(manifest.classes)), dtype=np.float32)
    folds = fold_indices(manifest, k, config.split_random_state)
    # Every fold trains afresh, also under --resume: a fold resumed from its last.ckpt would give
    # the epochs after it only, and the out-of-fold logits need every epoch. A fold takes seconds
    # on cached features; the refit on every image below resumes as any fit does.
    fold_config = replace(config, resume=False)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"cross-fitting ({k} folds)", total=k)
        for fold, (inside, held_out) in enumerate(folds):
            head = copy.deepcopy(model.get_classifier())
            _, module = train_head(head, *rows_of(inside), clean[held_out], labels[held_out], fold_config,
                                   manifest.classes, run,
                                   stage="/".join(filter(None, (stage, f"cv/fold{fold + 1}"))), positive=positive,
                                   keep_logits=True, progress_bar=False)
            oof[:, held_out] = np.stack(module.epoch_logits)
            progress.advance(task)
    best, aucs = choose_epoch(oof, labels, positive)
    member = f" {stage} ({arch})" if stage else ""
    where = f"Cross-fitting{member}: {k} folds ({grouping(manifest)}); out-of-fold AUC by epoch "
    if keep == "last":
        best = config.epochs - 1
        console.print(f"{where}reads {aucs[best]:.4f} at the last of {config.epochs} (best {max(aucs):.4f}); an "
                      f"ensemble's member keeps the last; refitting its head on all {len(labels)} images.")
    else:
        console.print(f"{where}peaks at epoch {best + 1} of {config.epochs} ({aucs[best]:.4f}); refitting the head on "
                      f"all {len(labels)} images for {best + 1} epochs.")
    train_head(model.get_classifier(), *rows_of(everything), None, None, config, manifest.classes, run, stage=stage,
               positive=positive, max_epochs=best + 1)
    score = ({"kept": "the last epoch", "last_epoch_val_auc": aucs[best]} if keep == "last"
             else {"best_epoch_val_auc": aucs[best]})
    selection = {"cv_folds": k, "chosen_epochs": best + 1, **score,
                 "out_of_fold_auc_by_epoch": [round(a, 5) for a in aucs], "grouping": grouping(manifest)}
    return selection, oof[best]


def crossfit_operating_point(oof_logits: np.ndarray, manifest: Manifest, positive: int | None, config: TrainConfig,
                             k: int, n_boot: int = 1000):
    """Temperature, operating point, metrics with bootstrap intervals, and probabilities, all
    from the out-of-fold predictions."""
    labels = manifest.labels
    temperature, point, metrics, probs = operating_point(
        oof_logits, labels, manifest.classes, positive, config,
        data=f"out-of-fold predictions ({k}-fold cross-fitting)")
    metrics["intervals"] = bootstrap_intervals(labels, probs, manifest.classes, point.value, n_boot=n_boot,
                                               positive=positive)
    metrics["validation"] = (f"out-of-fold predictions of {k}-fold cross-fitting over all {len(labels)} images; "
                             "the epoch count, temperature and threshold were chosen on these same predictions, "
                             "so the figures lean optimistic by that choice (intervals cover image sampling only)")
    return temperature, point, metrics, probs

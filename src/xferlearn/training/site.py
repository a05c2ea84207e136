"""Site calibration: re-choose how a trained model decides, on a small labelled sample of a site.

An operating point chosen on the training set's own validation split does not travel: at a
new site the same network's probabilities shift (on the chest X-ray set, normal images from
elsewhere score higher, and a validation threshold calls many of them pneumonia). With a few
dozen labelled images per class from the site, this re-fits the temperature, re-chooses the
threshold by the run's rule, and with `prior` folds the sample's class balance into the
classifier's bias, without training the network. It writes a new run folder: the same
weights with a new `OperatingPoint` (when="calibrate", with a bootstrap interval of the
threshold), so predict, evaluate, export and serve use it as they use any run.

The threshold moves only where the sample shows that the operating point moved: the run's
own threshold is kept (with its temperature, so every decision stays the run's) when it lies
inside the bootstrap 95% interval of the threshold the sample would choose. 100 images choose
a threshold with an interval as wide as 0.04 to 0.35; re-choosing inside that width is noise.
On simulated sites (benchmarks/site_rules.py: 100-image samples drawn 100 times from held-out
images, as they are and under shifts that move the operating point), this kept the run's
accuracy where nothing had moved (where always re-choosing lost up to a point on average and
4 points in an unlucky tenth of samples), and moved as often as needed under the large shifts.
`always_move` re-chooses in every case; `prior` (a new class balance) always re-chooses too.

The figures it prints on the sample are those of the data the threshold was chosen on: they
are optimistic by construction. Judge the result with `evaluate` on other images of the site.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, write_json
from ..config import THRESHOLDS
from ..data.folders import ImageDataset, scan
from ..data.images import DecodeCache
from ..errors import XferlearnError
from ..data.layout import check_outside
from ..data.phash import hashes
from ..evaluation.evaluate import evaluation_root
from ..evaluation.leaks import calibration_sample, describe_overlap, find_overlap, load_split
from ..evaluation.metrics import compute_metrics
from ..evaluation.thresholds import apply_temperature, choose_operating_point, fit_temperature
from ..models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..models.ensemble import classifiers
from ..models.features import image_loader
from ..models.predictor import Predictor
from ..rundir import RunDir, as_path

MIN_PER_CLASS = 20  # below this, a threshold chosen on the sample is mostly noise


def site_logits(checkpoint: Checkpoint, manifest, cache: DecodeCache, batch_size: int = 32) -> np.ndarray:
    """(V, N, C) logits of the sample through the network, over the TTA views where the run uses them."""
    predictor = Predictor(checkpoint, precision="fp32")
    dataset = ImageDataset(manifest.paths, manifest.digests, None, cache)
    with torch.inference_mode():
        return np.concatenate([predictor.view_logits(images).cpu().numpy()
                               for images, _ in image_loader(dataset, batch_size)], axis=1)


def threshold_interval(y, probs, positive, method, target, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the threshold the rule picks: how far another sample
    of the same size from the same site could move it (resampled within each class)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    values = []
    for _ in range(n_boot):
        pick = np.concatenate([rng.choice(idx, len(idx)) for idx in by_class])
        values.append(choose_operating_point(y[pick], probs[pick], positive, method, target).value)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def fold_prior(checkpoint: Checkpoint, site_prior: np.ndarray) -> None:
    """Make the probabilities refer to the site's class prior: softmax(z / T) re-weighted by
    site/old prior (Saerens et al., 2002) equals softmax((z + T log(site/old)) / T), so the
    shift goes into the classifier's bias and every engine (export included) computes it."""
    old = np.asarray(checkpoint.class_prior or [1 / len(site_prior)] * len(site_prior), dtype=float)
    model = checkpoint.build_model()
    heads = classifiers(model)  # an ensemble's logits are its members' mean: shift each member's bias
    for head in heads:
        if not isinstance(head, torch.nn.Linear) or head.bias is None:
            raise XferlearnError(f"--prior needs a linear classifier with a bias; {checkpoint.arch}'s head is "
                                 f"{type(head).__name__}. Calibrate without --prior.")
    with torch.no_grad():
        for head in heads:
            head.bias += torch.from_numpy(checkpoint.temperature * np.log(site_prior / old)).to(head.bias)
    checkpoint.state_dict = model.state_dict()
    checkpoint.class_prior = site_prior.tolist()


def calibrate_site(run: str | Path, data: str | Path, out: str | Path, *, prior: bool = False,
                   threshold: str | None = None, target_sensitivity: float | None = None,
                   n_boot: int = 1000, batch_size: int = 32, cache_dir: str | None = None,
                   min_per_class: int = MIN_PER_CLASS, always_move: bool = False) -> dict:
    """Re-choose temperature, threshold (and with `prior`, the class prior) of `run` on the
    labelled sample in `data`; write the re-calibrated run into `out`. Returns what was done."""
    source = RunDir.of(run)
    target = RunDir(out)
    if target.checkpoint.exists():
        raise XferlearnError(f"{target.root} already holds a model; choose another --out.")
    if target.root.resolve() == source.root.resolve():
        raise XferlearnError("--out must be a new folder: calibration never overwrites the run it starts from.")
    checkpoint = load_checkpoint(run)
    method = threshold or (checkpoint.operating_point.method if checkpoint.operating_point.method in THRESHOLDS
                           else "youden")
    target_sens = target_sensitivity if target_sensitivity is not None else checkpoint.operating_point.target
    if target_sensitivity is not None:
        method = "target_sensitivity"
    if method not in THRESHOLDS:
        raise XferlearnError(f"--threshold must be one of {THRESHOLDS}, not {method!r}.")
    if method == "target_sensitivity" and target_sens is None:
        raise XferlearnError("--threshold target_sensitivity needs --target-sensitivity, e.g. 0.95.")

    root = evaluation_root(as_path(data, "DATA"), checkpoint.classes)
    check_outside(out, [root])
    pre = checkpoint.preprocessing
    cache = DecodeCache.of(pre, cache_dir)
    manifest = scan(root, cache, classes=checkpoint.classes)
    counts = manifest.counts()
    small = {name: n for name, n in counts.items() if n < min_per_class}
    if small:
        raise XferlearnError(f"{root} is too small to calibrate on: {small} (each class needs at least "
                             f"{min_per_class} labelled images).")
    y = manifest.labels
    # The sample against the run's own images: a threshold re-chosen on images the run trained or
    # validated on is no site's. Said, and its hashes kept, so `evaluate` can say it too.
    phashes = hashes(manifest.paths, manifest.digests, cache)
    overlap = find_overlap(load_split(source.split), manifest.digests, phashes,
                           calibration_sample(source.calibration))
    logits = site_logits(checkpoint, manifest, cache, batch_size)
    before = {"temperature": checkpoint.temperature, "threshold": checkpoint.threshold,
              "operating_point": checkpoint.operating_point.to_dict(), "class_prior": checkpoint.class_prior}
    old_probs = np.mean([apply_temperature(v, checkpoint.temperature) for v in logits], axis=0)
    positive = checkpoint.positive_index
    old_metrics = compute_metrics(y, old_probs, checkpoint.classes, checkpoint.threshold, "as trained", positive)
    where = dict(data=f"site sample {root}", n=len(y), when="calibrate",
                 tta_views=len(logits) if checkpoint.tta else 0)
    # Where the run's threshold would do as well as any the sample can pick, keep the run's rule whole.
    gate = None if prior or always_move else _unmoved(checkpoint, y, old_probs, method, target_sens, n_boot)
    if gate is not None:
        decision = (f"kept the run's threshold {checkpoint.threshold:.4f} and temperature: it lies inside the 95% "
                    f"interval {gate[0]:.4f} to {gate[1]:.4f} of the threshold this sample would choose, so the "
                    "sample does not show that the operating point moved (--always-move re-chooses anyway)")
        probs, point = old_probs, checkpoint.operating_point
    else:
        probs, point = _rechoose(checkpoint, logits, y, prior, method, target_sens, n_boot, where)
        decision = ("temperature re-fitted on the sample; argmax decides" if checkpoint.positive_index is None else
                    "temperature and threshold re-chosen on the sample" +
                    ("" if prior or always_move else ": the sample's threshold interval excludes the run's"))
    metrics = compute_metrics(y, probs, checkpoint.classes, point.value, point.describe(), positive)
    record = {"source_run": str(source.root.resolve()), "site_data": str(root.resolve()), "counts": counts,
              "prior": prior, "before": before, "on_sample_before": old_metrics, "decision": decision,
              "unmoved_interval": gate,
              "after": {"temperature": checkpoint.temperature, "threshold": point.value,
                        "operating_point": point.to_dict(), "class_prior": checkpoint.class_prior},
              "on_sample_after": metrics,
              "overlap": describe_overlap(overlap, "An operating point chosen on them is not the site's.")
              if overlap.get("total") else None,
              # every sample this run's operating point came from, an earlier calibration's too
              "sample": calibration_sample(source.calibration) + [
                  {"path": path, "digest": digest, "phash": phash}
                  for path, digest, phash in zip(manifest.paths, manifest.digests, phashes)],
              "caveat": "figures on the sample are those of the data the threshold was chosen on (optimistic); "
                        "evaluate on other images of the site to judge it"}
    checkpoint.metrics = {**checkpoint.metrics, "site_calibration": {k: record[k] for k in
                                                                     ("site_data", "counts", "prior", "decision",
                                                                      "after")}}
    _copy_run_files(source, target)
    save_checkpoint(checkpoint, target.checkpoint)
    write_json(target.calibration, record)
    return record


def _unmoved(checkpoint: Checkpoint, y, probs, method: str, target_sens, n_boot: int) -> tuple | None:
    """The bootstrap interval of the threshold the sample would choose, on the run's own
    probabilities, when it contains the run's threshold (the sample does not show a move);
    None when it does not, or when there is no threshold to keep (argmax, another rule)."""
    point = checkpoint.operating_point
    if checkpoint.positive_index is None or (method, target_sens) != (point.method, point.target):
        return None
    interval = threshold_interval(y, probs, checkpoint.positive_index, method, target_sens, n_boot)
    return interval if interval[0] <= checkpoint.threshold <= interval[1] else None


def _rechoose(checkpoint: Checkpoint, logits: np.ndarray, y, prior: bool, method: str, target_sens,
              n_boot: int, where: dict):
    """Refit the temperature (and with `prior`, fold the sample's class balance in), then choose
    the threshold on the sample; returns (probabilities, operating point) and updates `checkpoint`."""
    checkpoint.temperature = fit_temperature(logits[0], y)
    if prior:
        site_prior = np.bincount(y, minlength=len(checkpoint.classes)) / len(y)
        shift = checkpoint.temperature * np.log(site_prior / np.asarray(checkpoint.class_prior
                                                                        or [1 / len(site_prior)] * len(site_prior)))
        fold_prior(checkpoint, site_prior)
        logits = logits + shift  # the same shift the bias now carries
    probs = np.mean([apply_temperature(v, checkpoint.temperature) for v in logits], axis=0)
    point = choose_operating_point(y, probs, checkpoint.positive_index, method, target_sens, **where)
    if checkpoint.positive_index is not None:
        interval = threshold_interval(y, probs, checkpoint.positive_index, method, target_sens, n_boot)
        point = replace(point, interval=interval)
    checkpoint.operating_point = point
    return probs, point


def _copy_run_files(source: RunDir, target: RunDir) -> None:
    """The source run's record (config, split, validation figures, training curves) comes along,
    so the new run is self-describing; exports are not copied (they carry the old threshold)."""
    files = [source.config, source.split, source.validation_metrics, source.validation_predictions]
    files += sorted(source.logs().rglob("metrics.csv")) if source.logs().is_dir() else []
    for path in files:
        if path.exists():
            atomic_write(target.root / path.relative_to(source.root), path.read_bytes())

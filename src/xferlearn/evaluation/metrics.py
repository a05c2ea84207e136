"""Metrics for a classifier's probabilities: pure functions over numpy arrays.

Conventions shared by the whole library:
- `probs` is an (N, C) array of class probabilities; `y_true` an (N,) int array of indices
  into `classes`, the sorted class names.
- Two classes: the positive class is the one the model was trained with (`--positive-class`,
  stored in the checkpoint and passed here as `positive`); by default the one named PNEUMONIA
  (any case) if present, else index 1. A case is called positive when p_pos >= threshold.
- More than two classes: the prediction is the argmax and there is no threshold.

Every number returned is a plain Python float or int, so a result goes straight into
metrics.json. A quantity that is undefined on the data given (sensitivity with no positive
cases, AUC with one class) is None rather than NaN: NaN is not valid JSON and silently
poisons any average it enters.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from ..errors import XferlearnError
from ..models.checkpoint import THRESHOLD_RULES

DEFAULT_THRESHOLD = 0.5
ARGMAX_SOURCE = THRESHOLD_RULES["argmax"]
POSITIVE_CLASS_NAME = "pneumonia"
# Bootstrap resamples are processed in chunks so memory stays bounded (chunk x N floats).
_BOOTSTRAP_CHUNK = 250


def positive_index(classes: list[str], positive: int | None = None) -> int:
    """Index of the positive class: `positive` where given (the checkpoint's), else PNEUMONIA
    (any case) where present, else 1."""
    if len(classes) < 2:
        raise XferlearnError(f"need at least two classes to evaluate, got {list(classes)}")
    if positive is not None:
        return int(positive)
    for index, name in enumerate(classes):
        if str(name).lower() == POSITIVE_CLASS_NAME:
            return index
    return 1


def named_positive_index(classes: list[str], name: str | None) -> int | None:
    """`--positive-class NAME` as an index (None: the default rule; None for multi-class)."""
    if len(classes) != 2:
        if name is not None:
            raise XferlearnError(f"--positive-class applies to two classes; these data have {len(classes)}: "
                                 f"{', '.join(classes)}.")
        return None
    if name is None:
        return positive_index(classes)
    matches = [i for i, c in enumerate(classes) if c == name] or [i for i, c in enumerate(classes)
                                                                  if c.lower() == str(name).lower()]
    if len(matches) != 1:
        raise XferlearnError(f"--positive-class {name!r} is not one of the classes: {', '.join(classes)}.")
    return matches[0]


def decision_rule(threshold: float | None, source: str, positive: str | None = None) -> str:
    """How a run decides, for a log line: "threshold 0.2903 for bees, the class sensitivity
    refers to (SOURCE)", or, with more than two classes, the most probable class, whose
    sensitivity and specificity are means over classes."""
    if threshold is None:
        return ("the most probable class (no threshold: multi-class; sensitivity and specificity "
                "are means over the classes, each against the rest)")
    named = f" for {positive}, the class sensitivity refers to" if positive else ""
    return f"threshold {threshold:.4f}{named} ({source})"


def compute_metrics(y_true, probs, classes, threshold: float | None,
                    threshold_source: str, positive: int | None = None) -> dict:
    """All headline metrics, json-ready. See the module docstring for the conventions.

    For two classes a threshold of None means 0.5. For more, the threshold is ignored and
    reported as None with the source "argmax (multi-class)".
    """
    classes = [str(name) for name in classes]
    y, p = _labels_and_probs(y_true, probs, classes)
    common = {
        "n": int(len(y)),
        "n_per_class": {name: int((y == k).sum()) for k, name in enumerate(classes)},
        "classes": classes,
    }
    if len(classes) == 2:
        return {**_binary_metrics(y, p, classes, threshold, threshold_source, positive), **common}
    return {**_multiclass_metrics(y, p, classes), **common}


def _binary_metrics(y, p, classes, threshold, threshold_source, positive=None) -> dict:
    pos = positive_index(classes, positive)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    is_pos, p_pos = y == pos, p[:, pos]

    def at(thr: float) -> tuple[np.ndarray, dict]:
        predicted = np.where(p_pos >= thr, pos, 1 - pos)
        matrix = confusion_matrix(y, predicted, labels=[0, 1])
        return matrix, _rates_from_confusion(matrix, pos)

    matrix, rates = at(threshold)
    _, rates_at_half = at(DEFAULT_THRESHOLD)
    return {
        **rates,
        "auc": _auc(is_pos, p_pos),
        "threshold": threshold,
        "threshold_source": str(threshold_source),
        "positive_class": classes[pos],
        "confusion_matrix": matrix.tolist(),
        "at_0.5": {key: rates_at_half[key] for key in ("accuracy", "sensitivity", "specificity")},
    }


def _multiclass_metrics(y, p, classes) -> dict:
    matrix = confusion_matrix(y, p.argmax(axis=1), labels=list(range(len(classes))))
    per_class = {}
    for k, name in enumerate(classes):
        rates = _rates_from_confusion(matrix, k)
        per_class[name] = {
            "sensitivity": rates["sensitivity"],
            "specificity": rates["specificity"],
            "auc": _auc(y == k, p[:, k]),
        }
    return {
        "accuracy": float(np.trace(matrix) / matrix.sum()),
        # Macro one-vs-rest over the classes where each is defined (sklearn's "ovr" refuses
        # outright when a class is missing from y_true; a partial test set is still useful).
        "auc": _mean_defined(c["auc"] for c in per_class.values()),
        "sensitivity": _mean_defined(c["sensitivity"] for c in per_class.values()),
        "specificity": _mean_defined(c["specificity"] for c in per_class.values()),
        "per_class": per_class,
        "threshold": None,
        "threshold_source": ARGMAX_SOURCE,
        "confusion_matrix": matrix.tolist(),
    }


def _rates_from_confusion(matrix: np.ndarray, k: int) -> dict:
    """One-vs-rest rates for class k from a full confusion matrix (rows true, cols predicted)."""
    tp = int(matrix[k, k])
    fn = int(matrix[k].sum()) - tp
    fp = int(matrix[:, k].sum()) - tp
    tn = int(matrix.sum()) - tp - fn - fp
    return {
        "accuracy": _ratio(np.trace(matrix), matrix.sum()),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def auc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """The standard error of an AUC from n_pos positives and n_neg negatives (Hanley & McNeil, 1982):
    for comparing AUCs whose predictions are gone (e.g. fine-tune stages' records)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)
    return float(np.sqrt(max(variance, 0.0) / max(n_pos * n_neg, 1)))


def bootstrap_intervals(y_true, probs, classes, threshold, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95, positive: int | None = None) -> dict:
    """Percentile-bootstrap intervals for accuracy, AUC, sensitivity and specificity.

    Resampling is stratified by true class, so every resample keeps the class counts of the
    data (the test set's composition is fixed by design, and no resample loses a class).
    Each resample is a vector of per-image counts, so every metric is a weighted sum and all
    resamples in a chunk are computed at once. The threshold is held fixed: the interval
    covers sampling of test images, not the choice of threshold. An interval is None where
    the metric is undefined on these data.
    """
    classes = [str(name) for name in classes]
    y, p = _labels_and_probs(y_true, probs, classes)
    if int(n_boot) < 1:
        raise XferlearnError(f"the bootstrap needs at least 1 resample (--bootstrap), not {n_boot}.")
    if not 0.0 < float(level) < 1.0:
        raise XferlearnError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    n_classes = len(classes)
    if n_classes == 2:
        pos = positive_index(classes, positive)
        thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        # As one-vs-rest for the positive class only: the binary metrics are about it.
        truth = [y == pos]
        called = [p[:, pos] >= thr]
        scores = [p[:, pos]]
        correct = truth[0] == called[0]
    else:
        predicted = p.argmax(axis=1)
        truth = [y == k for k in range(n_classes)]
        called = [predicted == k for k in range(n_classes)]
        scores = [p[:, k] for k in range(n_classes)]
        correct = predicted == y

    samples: dict[str, list] = {"accuracy": [], "auc": [], "sensitivity": [], "specificity": []}
    with np.errstate(invalid="ignore", divide="ignore"):
        for start in range(0, int(n_boot), _BOOTSTRAP_CHUNK):
            weights = _stratified_counts(y, n_classes, min(_BOOTSTRAP_CHUNK, n_boot - start), rng)
            samples["accuracy"].append(weights @ correct / weights.sum(axis=1))
            sens = [weights @ (t & c) / (weights @ t) for t, c in zip(truth, called)]
            spec = [weights @ (~t & ~c) / (weights @ ~t) for t, c in zip(truth, called)]
            aucs = [_weighted_auc(s, t, weights) for s, t in zip(scores, truth)]
            samples["sensitivity"].append(_nanmean_rows(sens))
            samples["specificity"].append(_nanmean_rows(spec))
            samples["auc"].append(_nanmean_rows(aucs))

    tail = (1.0 - float(level)) / 2.0
    intervals = {}
    for name, chunks in samples.items():
        values = np.concatenate(chunks)
        values = values[np.isfinite(values)]
        intervals[name] = (None if values.size == 0
                           else [float(v) for v in np.quantile(values, [tail, 1.0 - tail])])
    return intervals


def _stratified_counts(y: np.ndarray, n_classes: int, n_resamples: int,
                       rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, N) counts: how often each image is drawn, resampling within each class."""
    counts = np.zeros((n_resamples, len(y)))
    rows = np.arange(n_resamples)[:, None]
    for k in range(n_classes):
        members = np.flatnonzero(y == k)
        if members.size == 0:
            continue
        draws = rng.integers(0, members.size, size=(n_resamples, members.size))
        flat = (draws + rows * members.size).ravel()
        per_member = np.bincount(flat, minlength=n_resamples * members.size)
        counts[:, members] = per_member.reshape(n_resamples, members.size)
    return counts


def _weighted_auc(scores: np.ndarray, is_pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of per-image weights: P(score_pos > score_neg), ties counting half."""
    pos_idx, neg_idx = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    if pos_idx.size == 0 or neg_idx.size == 0:
        return np.full(len(weights), np.nan)
    order = neg_idx[np.argsort(scores[neg_idx], kind="stable")]
    neg_scores = scores[order]
    # cum_neg[:, j] is the weight of the j lowest-scoring negatives.
    cum_neg = np.concatenate([np.zeros((len(weights), 1)),
                              np.cumsum(weights[:, order], axis=1)], axis=1)
    below = cum_neg[:, np.searchsorted(neg_scores, scores[pos_idx], side="left")]
    up_to = cum_neg[:, np.searchsorted(neg_scores, scores[pos_idx], side="right")]
    pos_weights = weights[:, pos_idx]
    wins = (pos_weights * (below + 0.5 * (up_to - below))).sum(axis=1)
    return wins / (pos_weights.sum(axis=1) * cum_neg[:, -1])


def reliability_bins(y_true, probs, n_bins: int = 15) -> dict:
    """Top-label reliability table: per equal-width confidence bin, count, mean confidence and
    accuracy (NaN where a bin is empty). Bins are (lo, hi], the first one closed at 0."""
    y = _labels(y_true)
    p = _probs(probs, len(y))
    if int(n_bins) < 1:
        raise XferlearnError(f"n_bins must be at least 1, got {n_bins}")
    confidence = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(float)
    bin_of = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bin_of, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bin_of, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bin_of, weights=hit, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count,
            "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float:
    """Top-label ECE: the count-weighted mean gap between confidence and accuracy per bin."""
    bins = reliability_bins(y_true, probs, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((gaps * bins["count"][filled]).sum() / bins["count"].sum())


# --- input checks and small helpers -------------------------------------------------------

def _labels(y_true) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise XferlearnError("nothing to evaluate: there are no labelled images")
    if y.dtype.kind not in "biu" and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"y_true holds a negative class index {y.min()}")
    return y


def _matrix(values, n: int, what: str) -> np.ndarray:
    """An (n, C) float array of the model's `what` (probabilities or logits), finite."""
    m = np.asarray(values, dtype=float)
    if m.ndim != 2 or m.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n}, C), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise XferlearnError(f"the model produced non-finite {what} (NaN or inf)")
    return m


def _probs(probs, n: int) -> np.ndarray:
    return _matrix(probs, n, "probabilities")


def _labels_and_probs(y_true, probs, classes) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(y_true)
    p = _probs(probs, len(y))
    if p.shape[1] != len(classes):
        raise ValueError(f"probs has {p.shape[1]} columns but there are {len(classes)} classes")
    if len(classes) < 2:
        raise XferlearnError(f"need at least two classes to evaluate, got {classes}")
    if y.max() >= len(classes):
        raise ValueError(f"label {y.max()} out of range for classes {classes}")
    return y, p


def _scores(p_pos, n: int) -> np.ndarray:
    s = np.asarray(p_pos, dtype=float)
    if s.shape != (n,):
        raise ValueError(f"p_pos must have shape ({n},), got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise XferlearnError("the model produced non-finite probabilities (NaN or inf)")
    if s.min() < -1e-6 or s.max() > 1 + 1e-6:
        raise ValueError("p_pos must be probabilities in [0, 1], not logits")
    return s


def _logits(logits, n: int) -> np.ndarray:
    return _matrix(logits, n, "logits")


def _auc(is_pos: np.ndarray, scores: np.ndarray) -> float | None:
    if is_pos.all() or not is_pos.any():
        return None
    return float(roc_auc_score(is_pos, scores))


def _ratio(numerator, denominator) -> float | None:
    return None if denominator == 0 else float(numerator / denominator)


def _mean_defined(values) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _nanmean_rows(columns: list[np.ndarray]) -> np.ndarray:
    """Per-resample mean over classes, ignoring the undefined ones (NaN) without warnings."""
    stacked = np.stack(columns, axis=1)
    finite = np.isfinite(stacked)
    total = np.where(finite, stacked, 0.0).sum(axis=1)
    return total / finite.sum(axis=1)  # 0/0 -> NaN: undefined in every class

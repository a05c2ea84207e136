"""Choosing how a model decides: temperature, threshold, prior shift, operating point.

Pure functions over numpy arrays, used wherever a decision rule is chosen on labelled data:
at training time on the validation split, at export time for the int8 model, and by
`calibrate` on a site's sample. Never on the data a report is then computed on.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import roc_curve

from ..config import THRESHOLDS as THRESHOLD_METHODS
from ..errors import XferlearnError
from ..models.checkpoint import OperatingPoint
from .metrics import DEFAULT_THRESHOLD, _labels, _logits, _scores

def choose_threshold(y_true, p_pos, method: str = "youden",
                     target_sensitivity: float | None = None, *, pos_label: int = 1) -> float:
    """Pick a decision threshold on p_pos from labelled data (normally the validation split).

    `y_true` marks positives with `pos_label` (1 by default); anything else is negative.
    "youden" maximises sensitivity + specificity - 1 over the ROC thresholds, ties going to
    the threshold nearer 0.5. "target_sensitivity" returns the highest threshold whose
    sensitivity reaches the target, i.e. the most specific rule that meets it.
    """
    y = _labels(y_true)
    scores = _scores(p_pos, len(y))
    is_pos = y == pos_label
    n_pos = int(is_pos.sum())
    if n_pos == 0 or n_pos == len(y):
        raise XferlearnError(
            "cannot choose a threshold: the labels hold only one class; "
            "use a split with both positive and negative cases")
    # drop_intermediate=False keeps every distinct score: collinear points can tie on J.
    fpr, tpr, thresholds = roc_curve(is_pos, scores, drop_intermediate=False)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # the first ROC threshold is +inf
    if method == "youden":
        youden_j = tpr - fpr
        best = np.flatnonzero(youden_j >= youden_j.max() - 1e-12)
        chosen = best[np.argmin(np.abs(thresholds[best] - DEFAULT_THRESHOLD))]
    elif method == "target_sensitivity":
        if target_sensitivity is None or not 0.0 < float(target_sensitivity) <= 1.0:
            raise XferlearnError(
                f"target sensitivity must be in (0, 1], got {target_sensitivity!r}")
        # Thresholds fall and sensitivity rises along the curve: the first hit is the highest.
        chosen = np.flatnonzero(tpr >= float(target_sensitivity) - 1e-12)[0]
    else:
        raise XferlearnError(
            f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLD_METHODS)}")
    return _between_scores(float(thresholds[chosen]), scores)


def _between_scores(threshold: float, scores: np.ndarray) -> float:
    """Move a threshold from the score it sits on to midway down to the next lower score.

    The decisions on the data it was chosen from are unchanged, but no image sits exactly on
    it, so a last-bit difference between engines (bf16, ONNX, another batch size) cannot flip
    a call, and a perfectly separated split does not yield a threshold of exactly 1.0.
    """
    below = scores[scores < threshold]
    return float((threshold + below.max()) / 2) if below.size else threshold


def fit_temperature(logits, y_true) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on labelled data.

    Searched over T from 0.1 to 10. A result at either end says
    the data are separable or the logits carry no signal, not that calibration worked.
    """
    y = _labels(y_true)
    z = _logits(logits, len(y))
    if y.max() >= z.shape[1]:
        raise ValueError(f"label {y.max()} out of range for {z.shape[1]} logit columns")
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / np.exp(log_t), axis=1)[rows, y].mean())

    # log T in [-2.3, 2.3], T from 0.1 to 10: on a perfectly separated split the NLL keeps
    # falling as T -> 0, and saturated probabilities of exactly 0 or 1 would rank nothing.
    result = minimize_scalar(nll, bounds=(-2.3, 2.3), method="bounded",
                             options={"xatol": 1e-5})
    return float(np.exp(result.x))


def apply_temperature(logits, temperature) -> np.ndarray:
    """softmax(logits / temperature) as an (N, C) probability array."""
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise XferlearnError(f"temperature must be a positive number, got {temperature}")
    z = np.asarray(logits, dtype=float)
    return softmax(z / temperature, axis=-1)


def choose_operating_point(y: np.ndarray, probs: np.ndarray, positive: int | None, method: str,
                           target: float | None = None, **where) -> OperatingPoint:
    """The run's rule applied to labelled probabilities: a threshold on the positive class for
    two classes (Youden's J or a target sensitivity), argmax otherwise. `where` says what it
    was chosen on (OperatingPoint's data, n, when, engine, tta_views)."""
    if positive is None:
        return OperatingPoint("argmax", None, **where)
    value = choose_threshold((np.asarray(y) == positive).astype(int), np.asarray(probs)[:, positive], method,
                             target)
    return OperatingPoint(method, value, target=target if method == "target_sensitivity" else None, **where)

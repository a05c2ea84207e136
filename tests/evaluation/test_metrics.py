"""Metrics on small synthetic arrays whose answers are known by hand."""

import json
import time

import numpy as np
import pytest
from scipy.special import softmax

from xferlearn.errors import XferlearnError
from xferlearn.evaluation.metrics import bootstrap_intervals, compute_metrics, expected_calibration_error, positive_index
from xferlearn.evaluation.thresholds import apply_temperature, choose_threshold, fit_temperature
from xferlearn.models.predictor import prior_shift

BINARY = ["NORMAL", "PNEUMONIA"]


def binary_probs(p_pos):
    p_pos = np.asarray(p_pos, dtype=float)
    return np.stack([1 - p_pos, p_pos], axis=1)


def noisy_binary(n, seed=0, separation=1.5):
    """Labels and positive-class probabilities from two overlapping Gaussians."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p_pos = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * (2 * y - 1))))
    return y, p_pos


def test_positive_index_prefers_pneumonia_wherever_it_sorts():
    assert positive_index(["NORMAL", "PNEUMONIA"]) == 1
    assert positive_index(["Pneumonia", "healthy"]) == 0
    assert positive_index(["bacterial", "normal", "pneumonia"]) == 2
    assert positive_index(["cat", "dog"]) == 1
    with pytest.raises(XferlearnError):
        positive_index(["only"])


def test_binary_confusion_and_rates_by_hand():
    # positives (index 1): 0.9, 0.8, 0.4 -> TP, TP, FN; negatives: 0.1, 0.2, 0.6, 0.7 -> TN, TN, FP, FP
    y = [1, 1, 1, 0, 0, 0, 0]
    p_pos = [0.9, 0.8, 0.4, 0.1, 0.2, 0.6, 0.7]
    m = compute_metrics(y, binary_probs(p_pos), BINARY, 0.5, "given")
    assert m["confusion_matrix"] == [[2, 2], [1, 2]]  # rows true NORMAL, PNEUMONIA
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["ppv"] == pytest.approx(2 / 4)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    # AUC by counting pairs: 0.9 and 0.8 beat all four negatives, 0.4 beats two -> 10 of 12
    assert m["auc"] == pytest.approx(10 / 12)
    assert m["positive_class"] == "PNEUMONIA"
    assert m["n"] == 7 and m["n_per_class"] == {"NORMAL": 4, "PNEUMONIA": 3}
    json.dumps(m, allow_nan=False)  # plain Python values only


def test_threshold_moves_the_operating_point_and_at_half_stays():
    y = [1, 1, 1, 0, 0, 0, 0]
    p_pos = [0.9, 0.8, 0.4, 0.1, 0.2, 0.6, 0.7]
    m = compute_metrics(y, binary_probs(p_pos), BINARY, 0.35, "youden on val")
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.5
    assert m["threshold"] == 0.35 and m["threshold_source"] == "youden on val"
    assert m["at_0.5"]["sensitivity"] == pytest.approx(2 / 3)
    # A prediction is positive at p_pos == threshold exactly.
    assert compute_metrics(y, binary_probs(p_pos), BINARY, 0.4, "x")["sensitivity"] == 1.0


def test_positive_class_first_in_sorted_order():
    classes = ["PNEUMONIA", "zebra"]
    y = np.array([0, 0, 1, 1])  # two pneumonia, two zebra
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    m = compute_metrics(y, probs, classes, 0.5, "x")
    assert m["positive_class"] == "PNEUMONIA"
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]


def test_auc_is_none_with_one_class():
    m = compute_metrics([1, 1, 1], binary_probs([0.2, 0.7, 0.9]), BINARY, 0.5, "x")
    assert m["auc"] is None and m["specificity"] is None
    assert m["sensitivity"] == pytest.approx(2 / 3)


def test_youden_separates_separable_data():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p_pos = np.array([0.05, 0.2, 0.3, 0.45, 0.55, 0.7, 0.95])
    threshold = choose_threshold(y, p_pos)
    assert 0.45 < threshold <= 0.55
    m = compute_metrics(y, binary_probs(p_pos), BINARY, threshold, "youden")
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_youden_ties_go_to_the_threshold_nearer_half():
    # An uninformative score: J is 0 at every ROC threshold (1.0 clipped from inf, 0.8, 0.3),
    # so the tie must go to 0.3, the one nearest 0.5, not to the first or last candidate.
    y = np.array([0, 1, 0, 1])
    p_pos = np.array([0.3, 0.3, 0.8, 0.8])
    assert choose_threshold(y, p_pos) == pytest.approx(0.3)


def test_target_sensitivity_is_met_with_the_highest_threshold():
    y, p_pos = noisy_binary(400, seed=3)
    for target in (0.8, 0.9, 0.95):
        threshold = choose_threshold(y, p_pos, "target_sensitivity", target_sensitivity=target)
        sensitivity = (p_pos[y == 1] >= threshold).mean()
        assert sensitivity >= target
        # Any threshold above the lowest positive score it keeps would miss the target.
        lowest_kept = p_pos[y == 1][p_pos[y == 1] >= threshold].min()
        assert (p_pos[y == 1] > lowest_kept).mean() < target
        # ...and it sits midway below that score, on no validation score at all.
        assert threshold < lowest_kept and not np.isin(threshold, p_pos)


def test_choose_threshold_rejects_bad_input():
    with pytest.raises(XferlearnError, match="one class"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(XferlearnError):
        choose_threshold([0, 1], [0.2, 0.9], "target_sensitivity")
    with pytest.raises(XferlearnError, match="unknown"):
        choose_threshold([0, 1], [0.2, 0.9], "f1")


def test_choose_threshold_with_pos_label_zero():
    y = np.array([0, 0, 1, 1])  # class 0 is positive here
    # The rule keeps 0.9 and 0.7 positive; the threshold sits midway to the next score, 0.2.
    assert choose_threshold(y, [0.9, 0.7, 0.2, 0.1], pos_label=0) == pytest.approx(0.45)


def test_multiclass_path():
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.4, .5, .1], [.1, .8, .1],
                      [.2, .7, .1], [.1, .2, .7], [.6, .1, .3]])
    m = compute_metrics(y, probs, classes, 0.5, "ignored")
    assert m["threshold"] is None and m["threshold_source"] == "argmax (multi-class)"
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"]["sensitivity"] == 1.0
    assert m["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)
    assert m["sensitivity"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    aucs = [m["per_class"][c]["auc"] for c in classes]
    assert m["auc"] == pytest.approx(np.mean(aucs))
    json.dumps(m, allow_nan=False)


def test_bootstrap_contains_estimate_and_narrows_with_more_data():
    widths = {}
    for n in (200, 3000):
        y, p_pos = noisy_binary(n, seed=n)
        probs = binary_probs(p_pos)
        point = compute_metrics(y, probs, BINARY, 0.5, "x")
        intervals = bootstrap_intervals(y, probs, BINARY, 0.5, n_boot=300, seed=1)
        for name in ("accuracy", "auc", "sensitivity", "specificity"):
            lo, hi = intervals[name]
            assert lo <= point[name] <= hi, name
        widths[n] = intervals["auc"][1] - intervals["auc"][0]
    assert widths[3000] < widths[200] / 2


def test_bootstrap_is_reproducible_and_fast_enough():
    y, p_pos = noisy_binary(5000, seed=7)
    probs = binary_probs(p_pos)
    start = time.perf_counter()
    first = bootstrap_intervals(y, probs, BINARY, 0.5, n_boot=1000, seed=4)
    assert time.perf_counter() - start < 10  # budget is ~5 s; slack for a busy shared CPU
    assert first == bootstrap_intervals(y, probs, BINARY, 0.5, n_boot=1000, seed=4)


def test_bootstrap_multiclass_and_one_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    probs = softmax(rng.normal(size=(300, 3)) + 2 * np.eye(3)[y], axis=1)
    point = compute_metrics(y, probs, ["a", "b", "c"], None, "")
    intervals = bootstrap_intervals(y, probs, ["a", "b", "c"], None, n_boot=200)
    for name in ("accuracy", "auc", "sensitivity", "specificity"):
        assert intervals[name][0] <= point[name] <= intervals[name][1]
    single = bootstrap_intervals([1, 1, 1, 1], binary_probs([.2, .6, .7, .9]), BINARY, 0.5,
                                 n_boot=50)
    assert single["auc"] is None and single["specificity"] is None
    assert single["sensitivity"] is not None


def test_ece_calibrated_versus_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) < confidence  # right exactly as often as it claims
    y = np.where(correct, 1, 0)
    calibrated = binary_probs(confidence)  # predicts class 1 with that confidence
    assert expected_calibration_error(y, calibrated) < 0.02
    overconfident = binary_probs(np.full(n, 0.99))  # claims 99% but is right ~75% of the time
    assert expected_calibration_error(y, overconfident) == pytest.approx(0.99 - y.mean(), abs=1e-9)


def test_fit_temperature_recovers_two():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(4000, 3))
    y = np.array([rng.choice(3, p=row) for row in softmax(true_logits, axis=1)])
    temperature = fit_temperature(2 * true_logits, y)
    assert temperature == pytest.approx(2.0, rel=0.1)
    np.testing.assert_allclose(apply_temperature(2 * true_logits, 2.0), softmax(true_logits, axis=1))
    with pytest.raises(XferlearnError):
        apply_temperature(true_logits, 0)


def test_prior_shift_direction_and_normalisation():
    probs = np.array([[0.5, 0.5], [0.8, 0.2], [0.1, 0.9]])
    shifted = prior_shift(probs, np.array([0.5, 0.5]), np.array([0.2, 0.8]))
    np.testing.assert_allclose(shifted.sum(axis=1), 1.0)
    assert np.all(shifted[:, 1] > probs[:, 1])  # class 1 became commoner, so more likely
    assert shifted[0, 1] == pytest.approx(0.8)  # an undecided image takes the new prior
    np.testing.assert_allclose(prior_shift(probs, [1, 3], [1, 3]), probs)  # no shift, no change
    with pytest.raises(XferlearnError):
        prior_shift(probs, [0.5, 0.5], [1.0, 0.0])

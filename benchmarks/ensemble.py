"""Would averaging runs pay? The validation figures of each run and of the mean of their probabilities.

    python3 benchmarks/ensemble.py RUN_A RUN_B [RUN_C ...] [--boot 2000]

Each run folder's validation_predictions.csv holds the calibrated validation probabilities its
threshold was chosen on (averaged over the TTA views where the run used them). The runs must
share one validation split (the same data and seed give the same split.json). The ensemble's
probability is the mean of its members'; its threshold is chosen on those by Youden's J, as a
single run's is, so every row below is a validation operating point and nothing sees a test set.

Prints, per run and for the ensemble: AUC, accuracy, sensitivity and specificity with
stratified-bootstrap 95% intervals, and the paired bootstrap difference in AUC between the
ensemble and its best member (the same resamples for both), with the share of resamples in
which the ensemble wins. An ensemble costs the sum of its members' training and prediction
time; it pays only where that difference is clearly above zero.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from xferlearn.evaluation.metrics import bootstrap_intervals, compute_metrics, positive_index
from xferlearn.evaluation.thresholds import choose_threshold


def validation_probabilities(run: Path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(files, labels, probabilities (N, C), classes) from a run's validation_predictions.csv."""
    with open(run / "validation_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    classes = [name[2:] for name in rows[0] if name.startswith("p_")]
    probs = np.array([[float(row[f"p_{c}"]) for c in classes] for row in rows])
    return [row["file"] for row in rows], [row["label"] for row in rows], probs, classes


def stratified_resamples(y: np.ndarray, n_boot: int, seed: int = 0):
    """`n_boot` bootstrap index arrays of binary labels `y`, each class resampled on its own (so
    every resample holds both classes), the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for _ in range(n_boot):
        yield np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0):
    """Mean and 95% interval of AUC(a) - AUC(b) over stratified resamples shared by both, and P(a > b)."""
    diffs = np.array([roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx])
                      for idx in stratified_resamples(y, n_boot, seed)])
    return float(diffs.mean()), np.percentile(diffs, [2.5, 97.5]), float((diffs > 0).mean())


def paired_auc_cell(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int) -> str:
    """`paired_auc_difference` as a table cell: "+0.0003 (-0.0020 to +0.0026), 61%"."""
    diff, interval, wins = paired_auc_difference(y, a, b, n_boot)
    return f"{diff:+.4f} ({interval[0]:+.4f} to {interval[1]:+.4f}), {wins:.0%}"


def figures(name: str, y: np.ndarray, probs: np.ndarray, classes: list[str], positive: int, n_boot: int) -> dict:
    threshold = choose_threshold((y == positive).astype(int), probs[:, positive], "youden")
    metrics = compute_metrics(y, probs, classes, threshold, "Youden's J on validation")
    intervals = bootstrap_intervals(y, probs, classes, threshold, n_boot=n_boot)
    return {"name": name, "threshold": threshold, **{k: metrics[k] for k in ("auc", "accuracy", "sensitivity",
                                                                               "specificity")},
            "intervals": intervals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        sys.exit("ensemble: give at least two runs")

    members = [validation_probabilities(run) for run in args.runs]
    files, labels, _, classes = members[0]
    for run, (other_files, _, _, other_classes) in zip(args.runs[1:], members[1:]):
        if other_files != files or other_classes != classes:
            sys.exit(f"ensemble: {run} was validated on other images or classes than {args.runs[0]}; "
                     "train the members on the same data with the same seed")
    if len(classes) != 2:
        sys.exit("ensemble: two-class runs only (sensitivity and specificity need a positive class)")
    positive = positive_index(classes)
    y = np.array([classes.index(label) for label in labels])
    rows = [figures(str(run), y, probs, classes, positive, args.boot) for run, (_, _, probs, _) in zip(args.runs, members)]
    mean = np.mean([probs for _, _, probs, _ in members], axis=0)
    rows.append(figures(f"mean of the {len(members)}", y, mean, classes, positive, args.boot))

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"validation images: {len(y)} ({int((y == positive).sum())} {classes[positive]})\n")
    print("| model | AUC (95% CI) | accuracy (95% CI) | sensitivity | specificity | threshold |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ci = row["intervals"]
        print(f"| {row['name']} | {row['auc']:.4f} ({ci['auc'][0]:.4f}-{ci['auc'][1]:.4f}) | {row['accuracy']:.4f} "
              f"({ci['accuracy'][0]:.4f}-{ci['accuracy'][1]:.4f}) | {row['sensitivity']:.4f} | "
              f"{row['specificity']:.4f} | {row['threshold']:.3f} |")
    best = max(range(len(members)), key=lambda i: rows[i]["auc"])
    is_pos = (y == positive).astype(int)
    diff, interval, wins = paired_auc_difference(is_pos, mean[:, positive], members[best][2][:, positive], args.boot)
    print(f"\nAUC(ensemble) - AUC(best member, {rows[best]['name']}): {diff:+.4f} "
          f"(95% CI {interval[0]:+.4f} to {interval[1]:+.4f}); the ensemble is ahead in {100 * wins:.0f}% of "
          f"{args.boot} paired resamples")
    return 0


if __name__ == "__main__":
    sys.exit(main())

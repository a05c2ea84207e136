"""Which of two recipes does better on a small set? Their cross-fitted runs compared, paired by image.

    python3 benchmarks/compare_oof.py RUN_A RUN_B [RUN_A2 RUN_B2 ...] [--boot 2000]

Each pair is two runs trained on the same folder with cross-fitting (small data, or --cv K), so
every training image has an out-of-fold prediction in the run's validation_predictions.csv. A
set too small to hold a split out (ants and bees: 245 images) has no other signal to choose a
recipe on before its held-out images are scored. Per pair, paired by file: AUC of the binary
positive class and log loss for each run, their differences with 95% bootstrap intervals (the
same resamples for both), and accuracy at each run's own out-of-fold threshold. A log-loss
difference whose interval excludes zero is a signal on data where AUC reads 0.99 for both.
Pairs of different split seeds (--split-seed) show whether a gain holds beyond one fold draw.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ensemble import stratified_resamples, validation_probabilities  # benchmarks/ensemble.py, beside this file


def out_of_fold(run: Path) -> tuple[dict[str, int], dict[str, np.ndarray], int, float]:
    """(label index by file, probabilities by file, positive class index, the run's threshold)."""
    files, labels, probs, classes = validation_probabilities(run)
    metrics = json.loads((run / "validation_metrics.json").read_text())
    if len(classes) != 2:
        sys.exit(f"compare_oof: {run} has {len(classes)} classes; this comparison is for two")
    if "cross-fitting" not in str(metrics.get("validation", "")):
        sys.exit(f"compare_oof: {run} was not cross-fitted (its validation: {metrics.get('validation')!r})")
    positive = classes.index(metrics["positive_class"])
    return ({f: classes.index(label) for f, label in zip(files, labels)}, dict(zip(files, probs)), positive,
            float(metrics["threshold"]))


def compare(a: Path, b: Path, n_boot: int) -> str:
    (labels_a, probs_a, positive, threshold_a), (labels_b, probs_b, _, threshold_b) = out_of_fold(a), out_of_fold(b)
    if set(labels_a) != set(labels_b):
        sys.exit(f"compare_oof: {a} and {b} hold out-of-fold predictions for different images")
    files = sorted(labels_a)
    y = np.array([labels_a[f] == positive for f in files], dtype=int)
    pa = np.array([probs_a[f][positive] for f in files]).clip(1e-7, 1 - 1e-7)
    pb = np.array([probs_b[f][positive] for f in files]).clip(1e-7, 1 - 1e-7)
    loss_a, loss_b = (-np.log(np.where(y == 1, p, 1 - p)) for p in (pa, pb))
    resamples = list(stratified_resamples(y, n_boot))  # the same ones for both differences
    auc_diffs = np.array([roc_auc_score(y[idx], pa[idx]) - roc_auc_score(y[idx], pb[idx]) for idx in resamples])
    loss_diffs = np.array([loss_a[idx].mean() - loss_b[idx].mean() for idx in resamples])
    cell = lambda d, point: f"{point:+.4f} ({np.percentile(d, 2.5):+.4f} to {np.percentile(d, 97.5):+.4f})"
    accuracy = lambda p, t: np.mean((p >= t) == y)
    return (f"| {a.name} vs {b.name} | {len(y)} | {roc_auc_score(y, pa):.4f} / {roc_auc_score(y, pb):.4f} | "
            f"{cell(auc_diffs, roc_auc_score(y, pa) - roc_auc_score(y, pb))} | "
            f"{loss_a.mean():.4f} / {loss_b.mean():.4f} | {cell(loss_diffs, loss_a.mean() - loss_b.mean())} | "
            f"{accuracy(pa, threshold_a):.4f} ({threshold_a:.3f}) / {accuracy(pb, threshold_b):.4f} "
            f"({threshold_b:.3f}) |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pairs of cross-fitted runs: A B [A2 B2 ...]")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    args = parser.parse_args(argv)
    if len(args.runs) % 2:
        sys.exit("compare_oof: give the runs in pairs, A B [A2 B2 ...]")
    print("Command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print("| A vs B | images | AUC A / B | AUC A - B (95% CI) | log loss A / B | log loss A - B (95% CI) | "
          "accuracy at own threshold A / B |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(args.runs[::2], args.runs[1::2]):
        print(compare(a, b, args.boot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

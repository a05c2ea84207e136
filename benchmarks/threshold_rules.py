"""Does another threshold rule travel better than Youden's J? Rules chosen on validation, judged on a shift.

    python3 benchmarks/threshold_rules.py RUN POOL [RUN POOL ...]

Each RUN's threshold is re-chosen by several rules on the run's own validation predictions
(RUN/validation_predictions.csv: the images the run chose its threshold on, never POOL), then
judged on POOL, a labelled held-out folder from another acquisition pattern (a grouped or
shifted split from benchmarks/shift_split.py; never a test split). The rules:
- `youden`: Youden's J, as built (evaluation/thresholds.py);
- `0.5`, and `prevalence` (the validation share of positives: the Youden point of calibrated
  probabilities in the population limit);
- `plateau0/2/5`: the middle, in logit space, of the thresholds whose J is within 0, 2 or 5
  images' worth of the best (on a nearly separable split J has a wide plateau, and where on
  it the threshold lands could matter under shift);
- `smoothJ`: the maximum of J on kernel-smoothed class score distributions (logit space);
- `binormal`: the best threshold of two Gaussians fitted to the classes' logit scores.
Prints, per run, each rule's threshold and accuracy, sensitivity and specificity on POOL
(and the best accuracy any threshold on a grid reaches on POOL itself: an oracle, for scale),
then the mean accuracy and balanced accuracy of each rule over the runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from scipy.special import expit, logit
from scipy.stats import norm

from compare_runs import scored  # benchmarks/compare_runs.py, beside this file
from ensemble import validation_probabilities  # benchmarks/ensemble.py

from xferlearn.data.layout import expand_paths
from xferlearn.evaluation.thresholds import choose_threshold


def _logit(p):
    return logit(np.clip(p, 1e-7, 1 - 1e-7))


def plateau_middle(y, p, tolerance_images: int) -> float:
    z = _logit(p)
    pos, neg = z[y == 1], z[y == 0]
    cuts = np.unique(z)
    cuts = np.concatenate([[cuts[0] - 1], (cuts[1:] + cuts[:-1]) / 2, [cuts[-1] + 1]])
    j = np.array([(pos > t).mean() - (neg > t).mean() for t in cuts])
    tolerance = tolerance_images * (1 / len(pos) + 1 / len(neg)) / 2
    near = cuts[j >= j.max() - tolerance - 1e-12]
    return float(expit((near.min() + near.max()) / 2))


def smoothed_youden(y, p) -> float:
    z = _logit(p)
    pos, neg = z[y == 1], z[y == 0]
    bandwidth = lambda x: 1.06 * x.std() * len(x) ** -0.2  # noqa: E731 - Silverman's rule
    grid = np.linspace(z.min(), z.max(), 4000)
    j = norm.sf((grid[:, None] - pos) / bandwidth(pos)).mean(1) - norm.sf((grid[:, None] - neg) / bandwidth(neg)).mean(1)
    return float(expit(grid[j.argmax()]))


def binormal(y, p) -> float:
    z = _logit(p)
    pos, neg = z[y == 1], z[y == 0]
    grid = np.linspace(neg.mean(), pos.mean(), 4000)
    j = norm.sf((grid - pos.mean()) / pos.std()) - norm.sf((grid - neg.mean()) / neg.std())
    return float(expit(grid[j.argmax()]))


def rules(y, p) -> dict[str, float]:
    return {"youden": choose_threshold(y, p, "youden"), "0.5": 0.5, "prevalence": float(y.mean()),
            "plateau0": plateau_middle(y, p, 0), "plateau2": plateau_middle(y, p, 2),
            "plateau5": plateau_middle(y, p, 5), "smoothJ": smoothed_youden(y, p), "binormal": binormal(y, p)}


def judged(y, p, threshold: float) -> tuple[float, float, float]:
    called = p >= threshold
    return float((called == y).mean()), float(called[y == 1].mean()), float(1 - called[y == 0].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="RUN POOL pairs: a two-class run and a labelled folder of class "
                        "folders it was not tuned on")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give RUN POOL pairs")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    summary: dict[str, list[tuple[float, float]]] = {}
    for run, pool in zip(args.pairs[::2], args.pairs[1::2]):
        pool = Path(pool)
        _, val_labels, val_probs, classes = validation_probabilities(Path(run))
        names = sorted(d.name for d in pool.iterdir() if d.is_dir() and not d.name.startswith("."))
        listed = [(str(path), name) for name in names for path in expand_paths([pool / name])]
        probs, run_classes, _, positive = scored(run, [path for path, _ in listed], "auto")
        if len(run_classes) != 2 or sorted(run_classes) != names:
            sys.exit(f"threshold_rules: {run} has classes {run_classes}; {pool} has {names} (two-class runs only)")
        y_val = np.array([run_classes.index(label) == positive for label in val_labels], int)
        p_val = val_probs[:, classes.index(run_classes[positive])]
        y = np.array([run_classes.index(name) == positive for _, name in listed], int)
        p = probs[:, positive]
        print(f"\n{run} on {pool}: validation n {len(y_val)}, held-out n {len(y)} ({y.mean():.2f} positive)")
        print("| rule | threshold | accuracy | sensitivity | specificity |\n|---|---|---|---|---|")
        for rule, threshold in rules(y_val, p_val).items():
            accuracy, sensitivity, specificity = judged(y, p, threshold)
            summary.setdefault(rule, []).append((accuracy, (sensitivity + specificity) / 2))
            print(f"| {rule} | {threshold:.3f} | {accuracy:.4f} | {sensitivity:.4f} | {specificity:.4f} |")
        grid = np.linspace(0.01, 0.99, 99)
        accuracies = [judged(y, p, t)[0] for t in grid]
        print(f"oracle (best grid threshold on the held-out images themselves): {grid[int(np.argmax(accuracies))]:.2f}, "
              f"accuracy {max(accuracies):.4f}")
    print(f"\nmean over {len(args.pairs) // 2} runs:\n| rule | accuracy | balanced accuracy |\n|---|---|---|")
    for rule, values in summary.items():
        values = np.array(values)
        print(f"| {rule} | {values[:, 0].mean():.4f} | {values[:, 1].mean():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Small data, an ensemble: whose epoch count should cross-fitting choose? Measured on images it was not tuned on.

    python3 benchmarks/crossfit_epochs.py RUN HELD_OUT [--images 240] [--subsets 0,1,2,3,4]

On small data (training/crossfit.py) an ensemble's members are cross-fitted one by one: each
member's epoch count is the one whose out-of-fold AUC is best *for that member*, and the
ensemble's temperature and threshold come from the mean of the members' out-of-fold logits at
their own counts. Since session 12, an ensemble trained with a held-out split keeps every
member's last epoch instead, because per-member choices on a saturated split cost held-out AUC.
This compares, on small random subsets of a larger run's training images:

- `member`: each member its own best out-of-fold epoch count (the build);
- `shared`: one count for all, the one whose *ensemble* out-of-fold AUC is best;
- `last`: every member the full `--epochs` of the run's config.

RUN is a binary `--recipe linear` ensemble run trained on a shifted split's train side
(benchmarks/shift_split.py), HELD_OUT that split's val/. Features come from RUN's feature
store (benchmarks/head_variants.py's `member_features`; the clean view only). Each subset draws
`--images` of RUN's training images (stratified by class, a fresh draw per subset seed), and runs
what crossfit.py runs with head_variants.py's plain loop, which mirrors training/linear.py:
5 folds stratified by class and grouped by patient, a head per fold scored on its held-out fold
every epoch, the chosen count refitted on the whole subset on the same cosine schedule (spanning
`--epochs`), the threshold by Youden's J on the out-of-fold probabilities of the mean logits.
Prints, per subset and policy, the counts chosen, the out-of-fold AUC, and on HELD_OUT the AUC,
accuracy, sensitivity and specificity at that threshold, with the paired stratified-bootstrap
difference in AUC against `member`; then each member alone, as a single network cross-fitted on
the subset would be: held-out AUC at its own count and at the last epoch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from ensemble import paired_auc_cell  # benchmarks/ensemble.py, beside this file
from head_variants import member_features, parse, train_head  # benchmarks/head_variants.py, beside this file
from xferlearn.config import CV_FOLDS, TrainConfig
from xferlearn.evaluation.metrics import compute_metrics
from xferlearn.evaluation.thresholds import choose_threshold
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.ensemble import member_names
from xferlearn.rundir import RunDir
from xferlearn.training.crossfit import choose_epoch


def per_epoch(train, val, held, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Validation and held-out logits after every epoch, (epochs, N, 2) each, of a head trained on
    `train` for the run's full `--epochs` by head_variants.py's loop (a refit stopped at epoch e on
    the same cosine schedule computes what this one has after epoch e)."""
    trace = []
    train_head(train, val, held, parse("last", config), config.seed, trace=trace)
    return np.stack([v for v, _ in trace]), np.stack([h for _, h in trace])


def auc_of(y: np.ndarray, logits: np.ndarray, positive: int) -> float:
    return float(roc_auc_score(y == positive, torch.softmax(torch.from_numpy(logits), 1).numpy()[:, positive]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("held_out")
    parser.add_argument("--images", type=int, default=240, help="training images per subset (default: 240)")
    parser.add_argument("--subsets", default="0,1,2,3,4", help="subset seeds")
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args()
    print("command: python3 " + shlex.join(sys.argv))
    members, positive = member_features(args.run, args.held_out)
    if positive is None or len(members) < 2:
        sys.exit("crossfit_epochs: a binary ensemble run is needed")
    checkpoint = load_checkpoint(args.run)
    config, classes = TrainConfig.from_dict(checkpoint.config), checkpoint.classes
    train_entries = json.loads(RunDir(args.run).split.read_text())["train"]
    n_clean = len(train_entries)  # the clean view's rows come first, in split.json's order
    labels = np.array([entry["label"] for entry in train_entries])
    patients = np.array([entry.get("patient") or entry["path"] for entry in train_entries])
    y_held = members[0][2][1]
    if not np.array_equal(members[0][0][1][:n_clean], labels):
        sys.exit("crossfit_epochs: the run's training rows are not in split.json's order")
    print(f"{len(members)} members; {n_clean} training images to draw from; held out: {len(y_held)} images\n")
    print("| subset | policy | epochs chosen | out-of-fold AUC | held-out AUC | accuracy | sensitivity | specificity | "
          "threshold | AUC - member (95% CI), ahead in |\n|---|---|---|---|---|---|---|---|---|---|")
    names, alone = member_names(checkpoint.arch), []
    for subset in map(int, args.subsets.split(",")):
        rng = np.random.default_rng(subset)
        share = args.images / n_clean
        picked = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == k), round(share * (labels == k).sum()),
                                                    replace=False) for k in np.unique(labels)]))
        y = labels[picked]
        folds = list(StratifiedGroupKFold(n_splits=CV_FOLDS, shuffle=True, random_state=config.seed)
                     .split(np.zeros(len(y)), y, patients[picked]))
        oof, held_by_count = [], []
        for (x_train, _), _, (x_held, _) in members:
            x = x_train[:n_clean][picked]
            member_oof = np.zeros((config.epochs, len(y), 2), dtype=np.float32)
            for inside, outside in folds:
                member_oof[:, outside] = per_epoch((x[inside], y[inside]), (x[outside], y[outside]),
                                                   (x[outside], None), config)[0]
            oof.append(member_oof)
            held_by_count.append(per_epoch((x, y), (x, y), (x_held, None), config)[1])  # every count's refit
        member_counts = [choose_epoch(m, y, positive)[0] for m in oof]  # crossfit.py's own rule
        shared = choose_epoch(np.mean(oof, 0), y, positive)[0]
        policies = {"member": member_counts, "shared": [shared] * len(members),
                    "last": [config.epochs - 1] * len(members)}
        reference = None
        for policy, counts in policies.items():
            oof_logits = np.mean([m[e] for m, e in zip(oof, counts)], 0)
            held_logits = np.mean([h[e] for h, e in zip(held_by_count, counts)], 0)
            oof_probs = torch.softmax(torch.from_numpy(oof_logits), 1).numpy()
            held_probs = torch.softmax(torch.from_numpy(held_logits), 1).numpy()
            threshold = choose_threshold((y == positive).astype(int), oof_probs[:, positive], "youden")
            held = compute_metrics(y_held, held_probs, classes, threshold, "Youden's J on out-of-fold", positive)
            versus = "" if reference is None else paired_auc_cell((y_held == positive).astype(int),
                                                                  held_probs[:, positive], reference, args.boot)
            reference = held_probs[:, positive] if reference is None else reference
            print(f"| {subset} | {policy} | {', '.join(str(e + 1) for e in counts)} | "
                  f"{auc_of(y, oof_logits, positive):.4f} | {held['auc']:.4f} | {held['accuracy']:.4f} | "
                  f"{held['sensitivity']:.4f} | {held['specificity']:.4f} | {threshold:.3f} | {versus} |", flush=True)
        for name, count, held_logits in zip(names, member_counts, held_by_count):  # each member as a single network
            own, last = (torch.softmax(torch.from_numpy(held_logits[e]), 1).numpy()[:, positive]
                         for e in (count, config.epochs - 1))
            alone.append(f"| {subset} | {name} | {count + 1} | {roc_auc_score(y_held == positive, own):.4f} | "
                         f"{roc_auc_score(y_held == positive, last):.4f} | "
                         f"{paired_auc_cell((y_held == positive).astype(int), last, own, args.boot)} |")
    print("\nEach member alone, as a single network cross-fitted on the subset (its own count, as built, "
          "against all the epochs):\n\n| subset | member | own count | held-out AUC, own count | at the last epoch | "
          "last - own (95% CI), ahead in |\n|---|---|---|---|---|---|")
    print("\n".join(alone))
    return 0


if __name__ == "__main__":
    sys.exit(main())

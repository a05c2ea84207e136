"""Which of two recipes holds up better on labelled images they were not tuned on? A paired comparison.

    python3 benchmarks/compare_runs.py RUN_A RUN_B DATA [--boot 2000] [--engine auto]
    python3 benchmarks/compare_runs.py RUN_A+RUN_B+RUN_C RUN_A DATA     # an ensemble against a member
    python3 benchmarks/compare_runs.py RUN_A RUN_B DATA --data-a COPY    # A on a preprocessed copy of DATA
    python3 benchmarks/compare_runs.py RUN RUN DATA --engine torch --tta-a on --tta-b off   # what TTA buys a run
    python3 benchmarks/compare_runs.py RUN@stage2 RUN@stage1 DATA   # two saved stages of one fine-tune

Both runs predict every image of DATA (a folder of class folders: a grouped or shifted
held-out split such as benchmarks/shift_split.py's val/, never a test set one then tunes on).
Prints, per run, AUC, accuracy, sensitivity and specificity at the run's own validation
threshold with stratified-bootstrap 95% intervals, then the paired bootstrap difference in AUC
(the same resamples for both runs) with the share of resamples in which A is ahead. Two runs
whose difference interval spans zero are not told apart by DATA, however their point
figures compare. A run written `A+B[+C...]` is the ensemble of those runs: the mean of their
probabilities, its threshold chosen by Youden's J on the mean of their validation
probabilities (validation_predictions.csv; the members must share one validation split, as
runs on the same data with the same seed do), as benchmarks/ensemble.py does. A run written
`RUN@STAGE` is the fine-tune's saved stage RUN/stages/STAGE.pt (head, stage1, ...) in the run's
network, through ONNX Runtime (PyTorch where it cannot), with TTA as the run has it unless
--tta-a/--tta-b say otherwise, at the run's threshold (chosen for the stage the run kept, so
compare AUC).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np

from ensemble import paired_auc_difference, validation_probabilities  # benchmarks/ensemble.py, beside this file

import xferlearn
from xferlearn.data.layout import expand_paths
from xferlearn.evaluation.metrics import bootstrap_intervals, compute_metrics
from xferlearn.evaluation.thresholds import choose_threshold
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.predictor import Predictor
from xferlearn.rundir import RunDir
from xferlearn.training.finetune import load_stage


def stage_predictor(run: str, stage: str, tta: bool | None) -> Predictor:
    """The run's network holding the weights of its saved stage `stage`."""
    checkpoint = load_checkpoint(run)
    model = checkpoint.build_model()
    path = RunDir(run).stage(stage)
    if not path.is_file():
        sys.exit(f"compare_runs: {run} has no saved stage {stage!r} ({path} is missing)")
    load_stage(path, model)
    checkpoint.state_dict = model.state_dict()
    return Predictor(checkpoint, tta=tta, engine="onnx")


def predictions(run: Path, paths: list[str], engine: str, tta: bool | None = None
                ) -> tuple[np.ndarray, list[str], float, int]:
    """(probabilities (N, C), classes, threshold, positive index) of `run` (or `RUN@STAGE`) on
    `paths`; `tta`: None follows the checkpoint (PyTorch only otherwise, or a stage)."""
    options = {} if tta is None else {"tta": tta}
    run, _, stage = str(run).partition("@")
    with warnings.catch_warnings():  # TTA against the checkpoint's choice: AUC is what is compared
        warnings.simplefilter("ignore", UserWarning)
        rows = (stage_predictor(run, stage, tta).predict(paths) if stage
                else xferlearn.predict(run, paths, engine=engine, **options))
    bad = [row["file"] for row in rows if row["error"]]
    if bad:
        sys.exit(f"compare_runs: {run} could not read {len(bad)} images, e.g. {bad[0]}")
    classes = list(rows[0]["probabilities"])
    probs = np.array([[row["probabilities"][c] for c in classes] for row in rows])
    return probs, classes, rows[0]["threshold"], load_checkpoint(run).positive_index


def scored(spec: str, paths: list[str], engine: str, tta: bool | None = None
           ) -> tuple[np.ndarray, list[str], float, int]:
    """`predictions` of one run, or of the ensemble `A+B+...` (see the module's docstring)."""
    runs = [Path(part) for part in spec.split("+")]
    if len(runs) == 1:
        return predictions(runs[0], paths, engine, tta)
    members = [predictions(run, paths, engine) for run in runs]
    validation = [validation_probabilities(run) for run in runs]
    classes, positive = members[0][1], members[0][3]
    if any(m[1] != classes for m in members) or any(v[0] != validation[0][0] for v in validation):
        sys.exit(f"compare_runs: the members of {spec} differ in classes or validation images")
    y_val = np.array([classes.index(label) for label in validation[0][1]])
    val_mean = np.mean([v[2] for v in validation], axis=0)
    threshold = choose_threshold((y_val == positive).astype(int), val_mean[:, positive], "youden")
    return np.mean([m[0] for m in members], axis=0), classes, threshold, positive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="a run folder, A+B+... for the ensemble of those runs, or RUN@STAGE for a "
                        "fine-tune's saved stage (head, stage1, stage2, ...)")
    parser.add_argument("run_b", help="the same")
    parser.add_argument("data", type=Path, help="a labelled folder of class folders neither run was tuned on")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--engine", default="auto", help="prediction engine for both runs (default: auto)")
    parser.add_argument("--data-a", type=Path, help="run A predicts the same files from this folder instead: "
                        "a preprocessed copy of DATA (benchmarks/preprocessed_copy.py), paired by file name")
    for side in ("a", "b"):
        parser.add_argument(f"--tta-{side}", choices=("on", "off"), help=f"run {side.upper()} with or without "
                            "test-time augmentation, whatever it was trained with (needs --engine torch); the "
                            "threshold stays the run's, so compare AUC")
    args = parser.parse_args(argv)
    tta = {side: None if value is None else value == "on" for side, value in (("a", args.tta_a), ("b", args.tta_b))}

    class_names = sorted(d.name for d in args.data.iterdir() if d.is_dir() and not d.name.startswith("."))
    listed = [(str(p), name) for name in class_names for p in expand_paths([args.data / name])]
    paths, truth = [p for p, _ in listed], [name for _, name in listed]
    figures, positives = [], []
    paths_a = [str(args.data_a / Path(p).relative_to(args.data)) for p in paths] if args.data_a else paths
    for run, run_paths, side in ((args.run_a, paths_a, "a"), (args.run_b, paths, "b")):
        probs, classes, threshold, positive = scored(run, run_paths, args.engine, tta[side])
        if len(classes) != 2 or sorted(classes) != class_names:
            sys.exit(f"compare_runs: {run} has classes {classes}; DATA has {class_names} (two-class runs only)")
        y = np.array([classes.index(name) for name in truth])
        metrics = compute_metrics(y, probs, classes, threshold, "the run's own validation threshold",
                                  positive=positive)
        intervals = bootstrap_intervals(y, probs, classes, threshold, n_boot=args.boot, positive=positive)
        figures.append((run, metrics, intervals, threshold))
        positives.append(((y == positive).astype(int), probs[:, positive]))

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    is_pos = positives[0][0]
    print(f"images: {len(is_pos)} ({int(is_pos.sum())} positive) from {args.data}\n")
    print("| run | AUC (95% CI) | accuracy (95% CI) | sensitivity (95% CI) | specificity (95% CI) | threshold |")
    print("|---|---|---|---|---|---|")
    for run, m, ci, threshold in figures:
        cell = lambda k: f"{m[k]:.4f} ({ci[k][0]:.3f}-{ci[k][1]:.3f})"  # noqa: E731
        print(f"| {run} | {cell('auc')} | {cell('accuracy')} | {cell('sensitivity')} | {cell('specificity')} | "
              f"{threshold:.3f} |")
    diff, interval, wins = paired_auc_difference(is_pos, positives[0][1], positives[1][1], args.boot)
    print(f"\nAUC(A) - AUC(B): {diff:+.4f} (95% CI {interval[0]:+.4f} to {interval[1]:+.4f}); A is ahead in "
          f"{100 * wins:.0f}% of {args.boot} paired resamples")
    return 0


if __name__ == "__main__":
    sys.exit(main())

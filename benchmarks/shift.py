"""The stress test over several trained runs, side by side.

    python3 benchmarks/shift.py RUN [RUN ...] (--data DIR | --split val) [--shifts a,b] [--severities 1,3,5]
                                [--limit N] [--existing] [--train-linear DATA --work DIR]

Runs `xferlearn.stress` on each run (writing RUN/stress/ as the command does) and prints one
table of the summary figures (defined in src/xferlearn/evaluation/stress.py: mean error at
each run's own threshold over every shift and severity, and the error it adds to the clean
images; the same for 1 - AUC; the mean and lowest sensitivity and specificity) and each run's
worst shifts, then the machine and the command. `--existing` tabulates the RUN/stress/stress.json
already there instead of recomputing. It trains nothing unless `--train-linear DATA` asks for
the default linear recipe on DATA (into --work), which is then stressed beside the others.

`--split val` uses each run's own validation images: legitimate for a robustness measurement
(nothing is chosen on them here), but runs trained on different splits are then compared on
different images; pass --data for one common set.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from machine import describe as describe_machine  # benchmarks/machine.py


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="run folders made by `xferlearn train`")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="a labelled folder of class folders the runs were not trained on")
    source.add_argument("--split", choices=("val",), help="val: each run's own validation images")
    parser.add_argument("--shifts", help="comma-separated subset of the shifts (default: all)")
    parser.add_argument("--severities", help="comma-separated subset of 1,2,3,4,5 (default: all)")
    parser.add_argument("--limit", type=int, help="at most N images per class (seed 0)")
    parser.add_argument("--existing", action="store_true", help="tabulate RUN/stress/stress.json, recompute nothing")
    parser.add_argument("--train-linear", metavar="DATA", help="also train the default linear recipe on DATA")
    parser.add_argument("--work", help="where --train-linear writes its run (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.runs and not args.train_linear:
        parser.error("give at least one RUN, or --train-linear DATA")
    if not args.existing and not (args.data or args.split):
        parser.error("give --data DIR or --split val (or --existing)")
    return args


def summary_row(name: str, record: dict) -> list[str]:
    s, clean = record["summary"], record["clean"]

    def f(value):
        return "–" if value is None else f"{value:.3f}"

    return [name, str(record["n"]), f(clean.get("auc")), f(clean.get("accuracy")), f(s["mean_error"]),
            f"{s['added_error']:+.3f}", f(s.get("mean_auc_loss")),
            "–" if s.get("added_auc_loss") is None else f"{s['added_auc_loss']:+.3f}",
            f(s.get("mean_sensitivity")), f(s.get("min_sensitivity")),
            f(s.get("mean_specificity")), f(s.get("min_specificity")),
            ", ".join(f"{w['shift']} {w['mean_error']:.3f}" for w in s["worst_shifts"][:3])]


HEADER = ["run", "images", "clean AUC", "clean accuracy", "mean error", "added error", "mean 1-AUC", "added 1-AUC",
          "mean sensitivity", "lowest sensitivity", "mean specificity", "lowest specificity",
          "worst shifts (mean error)"]


def main(argv=None) -> int:
    args = parse_args(argv)
    import xferlearn
    from xferlearn._io import read_json
    from xferlearn.evaluation.stress_report import JSON
    from xferlearn.rundir import RunDir

    runs = [Path(r) for r in args.runs]
    if args.train_linear:
        work = Path(args.work or tempfile.mkdtemp(prefix="shift-"))
        result = xferlearn.train(data=args.train_linear, out=str(work / "linear"))
        runs.append(result.run_dir)
    records = {}
    for run in runs:
        if args.existing:
            record = read_json(RunDir.of(run).stress / JSON)
            if not isinstance(record, dict):
                sys.exit(f"shift.py: {run} has no stress/stress.json; run without --existing first")
        else:
            record = xferlearn.stress(run, args.data, split=args.split,
                                      shifts=args.shifts.split(",") if args.shifts else None,
                                      severities=[int(s) for s in args.severities.split(",")] if args.severities else None,
                                      limit=args.limit)
        records[str(run)] = record
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for name, record in records.items():
        print("| " + " | ".join(summary_row(name, record)) + " |")
    print()
    for name, record in records.items():
        severities = sorted({r["severity"] for r in record["results"]})
        print(f"{name}: {record['n']} images of {record['data']}; threshold {record['threshold']} "
              f"({record['threshold_source']}); shifts {','.join(record['shifts'])} at severities "
              f"{','.join(map(str, severities))}; {record['seconds']} s")
    print(f"machine: {describe_machine()} (shared with other jobs: timings are not speed figures)")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # an XferlearnError is one line for the user; anything else keeps its traceback
        if type(error).__name__ != "XferlearnError":
            raise
        sys.exit(f"shift.py: {error}")

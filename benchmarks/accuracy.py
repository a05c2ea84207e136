"""Validation accuracy of a recipe on the shared chest X-ray train split, and an ablation table.

    python3 benchmarks/accuracy.py [--recipe finetune] [--data DIR] [--limit N] [-- TRAIN FLAGS]
    python3 benchmarks/accuracy.py --ablate [--variants linear,finetune,...] [--limit N] [-- TRAIN FLAGS]

Trains with `xferlearn.train` in this process (fresh caches in a temporary folder unless
--warm), then prints the validation metrics with stratified-bootstrap 95% intervals, the
threshold and where it came from, the wall time, the machine and the command. Validation is
the patient-disjoint split carved from the data (the same split for every variant: it
depends only on the images and the seed); nothing here sees a test set.

--limit N trains on a stratified random N-image sample (seed 0), for smoke runs.
--ablate trains each variant below on the same data and prints one table; the finetune
variants run with TTA on and report the figures without it as well (each with its own
validation threshold). Flags after `--` go to every variant (e.g. `-- --image-size 128`).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import describe as describe_machine  # benchmarks/machine.py

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224" / "train"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
# name -> (what it tests, TrainConfig overrides)
VARIANTS = {
    "linear": ("frozen base, head on cached features (article augmentation)", dict(recipe="linear", tta=True)),
    "finetune": ("the finetune defaults", dict(recipe="finetune", tta=True)),
    "finetune-article": ("augmentation: the article's (shear, zoom, horizontal flip)",
                         dict(recipe="finetune", augment="article", tta=True)),
    "finetune-noaug": ("augmentation: none", dict(recipe="finetune", augment="none", tta=True)),
    "finetune-ema": ("EMA of the weights, decay 0.99", dict(recipe="finetune", ema=0.99, tta=True)),
    "finetune-bn-last": ("BatchNorm statistics update in the last stage",
                         dict(recipe="finetune", bn_policy="last_stage", tta=True)),
    "finetune-4ep": ("4 epochs per stage instead of 3", dict(recipe="finetune", finetune_epochs=4, tta=True)),
    "finetune-all": ("a third stage: every layer", dict(recipe="finetune", stages="4,9,all", tta=True)),
    "finetune-lite1": ("EfficientNet-Lite1 at 240 px",
                       dict(recipe="finetune", backbone="efficientnet_lite1", tta=True)),
    "finetune-lite2": ("EfficientNet-Lite2 at 260 px",
                       dict(recipe="finetune", backbone="efficientnet_lite2", tta=True)),
}


def sample_folder(data: Path, limit: int, work: Path) -> Path:
    """A folder of symlinks to a stratified random `limit`-image sample of `data` (seed 0)."""
    classes = sorted(p.name for p in data.iterdir() if p.is_dir())
    files = {c: sorted(f for f in (data / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    total = sum(len(v) for v in files.values())
    rng = random.Random(0)
    target = work / f"sample{limit}"
    for name, members in files.items():
        (target / name).mkdir(parents=True, exist_ok=True)
        for f in rng.sample(members, max(1, round(limit * len(members) / total))):
            (target / name / f.name).symlink_to(f.resolve())
    return target


def parse_flags(extra: list[str]) -> dict:
    """`xferlearn train` flags -> TrainConfig options, through the CLI's own parser."""
    from dataclasses import fields

    from xferlearn.cli import build_parser
    from xferlearn.config import TrainConfig

    args = build_parser().parse_args(["train", "DATA", *extra])
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in defaults and k != "data" and v != defaults[k]}


def run_variant(data: Path, out: Path, cache: Path, options: dict) -> dict:
    from xferlearn import train
    from xferlearn.evaluation.metrics import bootstrap_intervals

    started = time.perf_counter()
    result = train(data=str(data), out=str(out), cache_dir=str(cache), **options)
    seconds = time.perf_counter() - started
    with open(out / "validation_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    classes = result.metrics["classes"]
    labels = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    intervals = bootstrap_intervals(labels, probs, classes, result.metrics["threshold"], n_boot=1000)
    return {"metrics": result.metrics, "intervals": intervals, "seconds": seconds, "run": out}


def print_run(name: str, options: dict, outcome: dict) -> None:
    m, ci = outcome["metrics"], outcome["intervals"]
    fmt = lambda key: f"{m[key]:.4f} [{ci[key][0]:.4f}, {ci[key][1]:.4f}]"  # noqa: E731
    print(f"\n## {name}: {options}")
    print(f"validation (n={m['n']}, {m['n_per_class']}): AUC {fmt('auc')}, accuracy {fmt('accuracy')}, "
          f"sensitivity {fmt('sensitivity')}, specificity {fmt('specificity')}")
    print(f"threshold {m['threshold']:.4f}: {m['threshold_source']}")
    if "without_tta" in m:
        w = m["without_tta"]
        print(f"without TTA (own threshold {w['threshold']:.4f}): AUC {w['auc']:.4f}, accuracy {w['accuracy']:.4f}")
    selection = m.get("selection", {})
    if "stages" in selection:
        print("stages (best validation AUC, epochs run, seconds): " + ", ".join(
            f"{s['stage']} {s['val_auc']:.4f} ({s['epochs']}, {s.get('seconds', 0):.0f} s)"
            for s in selection["stages"])
            + f"; chosen {selection['chosen_stage']}")
    print(f"confusion matrix (rows true {m['classes']}): {m['confusion_matrix']}")
    print(f"wall time: {outcome['seconds']:.0f} s; run folder: {outcome['run']}")


def print_table(outcomes: dict) -> None:
    print("\n| variant | what | TTA | val AUC (95% CI) | val accuracy (95% CI) | sens | spec | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (what, outcome) in outcomes.items():
        m, ci = outcome["metrics"], outcome["intervals"]
        if "without_tta" in m:
            w = m["without_tta"]
            print(f"| {name} | {what} | off | {w['auc']:.4f} | {w['accuracy']:.4f} | {w['sensitivity']:.3f} | "
                  f"{w['specificity']:.3f} | |")
        print(f"| {name} | {what} | {'on' if 'without_tta' in m else 'off'} | {m['auc']:.4f} "
              f"({ci['auc'][0]:.3f}-{ci['auc'][1]:.3f}) | {m['accuracy']:.4f} "
              f"({ci['accuracy'][0]:.3f}-{ci['accuracy'][1]:.3f}) | {m['sensitivity']:.3f} | {m['specificity']:.3f} "
              f"| {outcome['seconds']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--recipe", choices=("linear", "finetune"), default="finetune")
    parser.add_argument("--limit", type=int, help="train on a stratified sample of this many images")
    parser.add_argument("--ablate", action="store_true", help="run the variants and print a table")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"with --ablate; from {', '.join(VARIANTS)}")
    parser.add_argument("--warm", action="store_true", help="reuse $XFERLEARN_CACHE instead of a fresh cache")
    parser.add_argument("--out", type=Path, help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="`xferlearn train` flags for every run, after --")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data}: pass --data", file=sys.stderr)
        return 2
    names = args.variants.split(",") if args.ablate else [args.recipe]
    unknown = [n for n in names if args.ablate and n not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    common = parse_flags([a for a in args.extra if a != "--"])
    work = args.out or Path(tempfile.mkdtemp(prefix="xferlearn-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("XFERLEARN_CACHE", work / "cache")) if args.warm else work / "cache"
    data = sample_folder(args.data, args.limit, work) if args.limit else args.data

    outcomes = {}
    for name in names:
        what, overrides = VARIANTS[name] if args.ablate else (args.recipe, dict(recipe=args.recipe))
        options = {**common, **overrides} if args.ablate else {**overrides, **common}
        outcome = run_variant(data, work / name, cache, options)
        print_run(name, options, outcome)
        outcomes[name] = (what, outcome)
    print(f"\nmachine: {describe_machine()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"data: {args.data}" + (f" (stratified sample of {args.limit}, seed 0)" if args.limit else ""))
    if args.ablate:
        print_table(outcomes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train `--recipe linear` on the full shared train split; print validation metrics and wall time.

    python3 benchmarks/train_linear.py [--data DIR] [--views K] [--backbone NAME] [--warm]

Runs `xferlearn train` as a user would (a subprocess, a fresh cache unless --warm), so the
time is end to end: scan and decode, features, head, threshold, checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe as describe_machine  # benchmarks/machine.py

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224" / "train"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--warm", action="store_true", help="reuse $XFERLEARN_CACHE instead of a fresh cache")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further `xferlearn train` flags, after --")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no data at {args.data}: pass --data", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="xferlearn-bench-"))
    env = dict(os.environ)
    if not args.warm:
        env["XFERLEARN_CACHE"] = str(work / "cache")
    extra = [a for a in args.extra if a != "--"]
    command = ["xferlearn", "train", str(args.data), "--recipe", "linear", "--out", str(work / "run"), *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - started
    metrics = json.loads((work / "run" / "validation_metrics.json").read_text())
    print(f"\n## linear recipe on {args.data}")
    print(f"machine: {describe_machine()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"train command: {shlex.join(command)} ({'warm' if args.warm else 'fresh'} cache)")
    print(f"wall time: {seconds:.0f} s")
    print(f"validation (n={metrics['n']}): AUC {metrics['auc']:.4f}, accuracy {metrics['accuracy']:.4f}, "
          f"sensitivity {metrics['sensitivity']:.4f}, specificity {metrics['specificity']:.4f}")
    print(f"threshold {metrics['threshold']:.4f}: {metrics['threshold_source']}")
    print(f"confusion matrix (rows true {metrics['classes']}): {metrics['confusion_matrix']}")
    print(f"run folder: {work / 'run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

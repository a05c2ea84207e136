"""Split a labelled folder into a small calibration sample and the rest, by patient (a benchmark tool).

    python3 benchmarks/site_sample.py FOLDER OUT [--n 100] [--seed 0]

Writes OUT/sample/{class}/ (about N images, each class in its share of FOLDER, whole patients)
and OUT/rest/{class}/ as symlinks, so that `xferlearn calibrate RUN OUT/sample --out RUN2` and
`xferlearn evaluate RUN2 OUT/rest` judge a site calibration on images it was not chosen on.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from xferlearn.data.folders import patient_id  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=100, help="images in the sample (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    classes = sorted(p.name for p in args.folder.iterdir() if p.is_dir())
    files = {c: sorted(p for p in (args.folder / c).iterdir() if p.is_file()) for c in classes}
    total = sum(len(f) for f in files.values())
    for name in classes:
        patients = defaultdict(list)
        for path in files[name]:
            patients[patient_id(path.name) or path.name].append(path)
        order = list(patients)
        rng.shuffle(order)
        want, taken = round(args.n * len(files[name]) / total), 0
        for patient in order:
            side = "sample" if taken < want else "rest"
            taken += len(patients[patient]) if side == "sample" else 0
            for path in patients[patient]:
                (args.out / side / name).mkdir(parents=True, exist_ok=True)
                (args.out / side / name / path.name).symlink_to(path.resolve())
        print(f"{name}: {taken} in the sample, {len(files[name]) - taken} in the rest")
    return 0


if __name__ == "__main__":
    sys.exit(main())

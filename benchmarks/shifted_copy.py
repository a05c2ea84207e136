"""A copy of a labelled folder under one of the stress test's shifts, to compare runs on it, paired.

    python3 benchmarks/shifted_copy.py DATA OUT --shift text --severity 5 --like RUN_A
    python3 benchmarks/compare_runs.py RUN_A RUN_B OUT

`xferlearn stress` reports each run alone; this writes the shifted images themselves (lossless
PNG, decoded as RUN decodes them: its input size and interpolation, so predict sees exactly the
pixels stress would shift; runs compared on it should share those) so
that `compare_runs.py` can give the paired bootstrap difference of two runs on them. Every
image gets the shift `xferlearn stress` gives it (evaluation/corruptions.py, seeded by its
content hash), before the run's contrast step, which predict then applies, as stress does.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from xferlearn._io import content_hash
from xferlearn.config import STRESS_SHIFTS
from xferlearn.data.augment import to_tensor
from xferlearn.data.layout import class_folders, expand_paths
from xferlearn.data.images import decode
from xferlearn.evaluation.corruptions import corrupt, seed_for
from xferlearn.models.checkpoint import load_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a labelled folder of class folders (a held-out split)")
    parser.add_argument("out", type=Path, help="where to write the shifted copy (CLASS/NAME.png)")
    parser.add_argument("--shift", choices=STRESS_SHIFTS, required=True)
    parser.add_argument("--severity", type=int, choices=range(1, 6), required=True)
    parser.add_argument("--like", type=Path, required=True, metavar="RUN",
                        help="a run whose decoding (input size, interpolation) the copy takes")
    args = parser.parse_args(argv)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    pre = load_checkpoint(args.like).preprocessing
    written = 0
    for name in class_folders(args.data):
        (args.out / name).mkdir(parents=True, exist_ok=True)
        for path in expand_paths([args.data / name]):
            data = path.read_bytes()  # read once: hashed for the seed (as stress seeds it), then decoded
            image = corrupt(to_tensor(decode(data, pre.input_size, pre.interpolation)), args.shift, args.severity,
                            seed_for(content_hash(data), args.shift, args.severity))
            Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(
                args.out / name / (path.stem + ".png"))
            written += 1
    print(f"{written} images of {args.data} under {args.shift} at severity {args.severity} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

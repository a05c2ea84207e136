"""A preprocessed copy of a split, to try a preprocessing idea before building it (a benchmark tool).

    python3 benchmarks/preprocessed_copy.py SPLIT OUT --kind identity|equalize|clahe|crop80

Writes OUT/{train,val}/CLASS/NAME for every image of SPLIT/{train,val}/CLASS (a folder such as
benchmarks/shift_split.py writes), as 8-bit gray JPEG q95 after the transform: `identity` (the
re-encoding alone: the baseline every other copy is compared with), `equalize` (PIL's global
histogram equalisation), `clahe` (xferlearn's own, data/contrast.py) or `crop80` (the central 80%,
resized back: less of the borders, markers and shoulders). Then train on OUT/train with
`--contrast none` and compare it with a run on the identity copy, each on its own copy of val/,
paired by file name:

    python3 benchmarks/compare_runs.py RUN_A RUN_IDENTITY IDENTITY/val --data-a OUT/val

(benchmarks/RESULTS.md, session 6). Session 6 built the winner, CLAHE, into xferlearn
(`--contrast`): for it, compare runs on the original folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from xferlearn.data.contrast import equalize  # noqa: E402  (the CLAHE xferlearn applies)

KINDS = ("identity", "equalize", "clahe", "crop80")


def transform(gray: Image.Image, kind: str) -> Image.Image:
    if kind == "equalize":
        return ImageOps.equalize(gray)
    if kind == "clahe":
        return Image.fromarray(equalize(np.asarray(gray.convert("RGB")), "clahe")[..., 0])
    if kind == "crop80":
        w, h = gray.size
        return gray.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((w, h), Image.Resampling.BICUBIC)
    return gray


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("split", type=Path, help="a folder holding train/ and val/, each of class folders")
    parser.add_argument("out", type=Path, help="where to write the copy")
    parser.add_argument("--kind", choices=KINDS, required=True)
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} exists: choose another folder", file=sys.stderr)
        return 2
    n = 0
    for source in sorted(args.split.glob("*/*/*")):
        side, name = source.parent.parent.name, source.parent.name
        if side not in ("train", "val") or not source.is_file():
            continue
        dest = args.out / side / name / source.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        transform(Image.open(source).convert("L"), args.kind).save(dest, format="JPEG", quality=95)
        n += 1
    print(f"{n} images written to {args.out} ({args.kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

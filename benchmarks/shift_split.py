"""Validation splits of the chest X-ray train folder that shift away from its training part (a benchmark tool).

    python3 benchmarks/shift_split.py OUT [--data DIR] [--quarter 0.25]
    python3 benchmarks/shift_split.py OUT --by batch [--held IM]   # a NORMAL batch held out

`--by batch`: the shared train split's NORMAL images come in two acquisition batches, `IM-...`
(597) and `NORMAL2-IM-...` (744). This trains on the `IM-` normals and two thirds of the
pneumonia patients and validates on every `NORMAL2-` normal and the other third: a milder
shift (the linear recipe reads about 0.99 there), a second signal so that a recipe chosen on
one split can be checked on another. `--held IM` swaps the NORMAL batches (validate on the 597
`IM-` normals, train on the `NORMAL2-` ones).

The default, `--by sharpness`:

On the shared train split, pneumonia images are blurrier than normal ones (mean absolute
Laplacian of the 224 px grayscale: 7.2 against 5.4, /work/shared/data/README.md), an
acquisition cue a model can learn instead of the disease. This ranks *patients* by the mean
sharpness of their images and puts into validation the blurriest quarter of NORMAL images
and the sharpest quarter of PNEUMONIA images (whole patients, ranked by their mean), i.e. the cases where the shortcut points the
wrong way; every other patient trains. Both sides are written as folders of symlinks:

    OUT/train/{NORMAL,PNEUMONIA}/...   ->  xferlearn train OUT/train ...
    OUT/val/{NORMAL,PNEUMONIA}/...     ->  xferlearn evaluate RUN OUT/val

Patients never straddle the split, and an image byte-identical to a validation image is left
out of train. It is made from the train folder alone: it is a development signal, not the
official test split, and must never be reported as test. OUT/split.json records the ranking.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from xferlearn.data.folders import patient_id  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224" / "train"
CLASSES = ("NORMAL", "PNEUMONIA")


def sharpness(path: Path) -> float:
    """Mean absolute Laplacian of the 224 px grayscale image."""
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray.shape != (224, 224):
        gray = cv2.resize(gray, (224, 224), interpolation=cv2.INTER_AREA)
    return float(np.abs(cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F)).mean())


def make_split(data: Path, out: Path, quarter: float = 0.25) -> dict:
    files = {name: sorted(p for p in (data / name).iterdir() if p.is_file()) for name in CLASSES}
    scores, digests = {}, {}
    for name in CLASSES:
        for path in files[name]:
            scores[path] = sharpness(path)
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    val: set[Path] = set()
    record = {"data": str(data), "quarter": quarter, "classes": {}}
    for name, blurry_first in (("NORMAL", True), ("PNEUMONIA", False)):
        patients = defaultdict(list)
        for path in files[name]:
            patients[patient_id(path.name) or path.name].append(path)
        means = {p: float(np.mean([scores[f] for f in fs])) for p, fs in patients.items()}
        order = sorted(means, key=means.get, reverse=not blurry_first)
        # Whole patients, in order, until a quarter of the class's images is reached.
        chosen, taken = [], 0
        for patient in order:
            if taken >= quarter * len(files[name]):
                break
            chosen.append(patient)
            taken += len(patients[patient])
        for patient in chosen:
            val.update(patients[patient])
        record["classes"][name] = {"patients": len(order), "val_patients": len(chosen),
                                   "val_sharpness_cut": means[chosen[-1]],
                                   "mean_sharpness_all": float(np.mean([scores[f] for f in files[name]]))}
    record["counts"] = write_split(out, [(path, name, "val" if path in val else "train")
                                         for name in CLASSES for path in files[name]], digests)
    (out / "split.json").write_text(json.dumps(record, indent=2))
    return record


def write_split(out: Path, placed: list[tuple[Path, str, str]], digests: dict[Path, str]) -> dict:
    """Symlink each (path, class, side) into OUT/side/class, leaving out of train any image
    byte-identical to a validation image; the counts per side and class."""
    val_digests = {digests[path] for path, _, side in placed if side == "val"}
    counts: dict = {"train": defaultdict(int), "val": defaultdict(int), "dropped_duplicates": 0}
    for path, name, side in placed:
        (out / side / name).mkdir(parents=True, exist_ok=True)
        if side == "train" and digests[path] in val_digests:
            counts["dropped_duplicates"] += 1
            continue
        link = out / side / name / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
        counts[side][name] += 1
    return {k: dict(v) if isinstance(v, defaultdict) else v for k, v in counts.items()}


def make_batch_split(data: Path, out: Path, held: str = "NORMAL2") -> dict:
    """Validate on the second NORMAL batch (`NORMAL2-IM-...`, 744 images; with held="IM", the
    first, `IM-...`, 597) and every third pneumonia patient (sorted by id); train on the other
    NORMAL batch and the other patients."""
    placed = []
    for name in CLASSES:
        files = sorted(p for p in (data / name).iterdir() if p.is_file())
        patients = sorted({patient_id(p.name) or p.name for p in files})
        for path in files:
            in_val = (path.name.startswith(f"{held}-") if name == "NORMAL"
                      else patients.index(patient_id(path.name) or path.name) % 3 == 0)
            placed.append((path, name, "val" if in_val else "train"))
    digests = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path, _, _ in placed}
    record = {"data": str(data), "by": "batch", "held": held, "counts": write_split(out, placed, digests)}
    (out / "split.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write train/ and val/ (symlinks) into")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the chest X-ray train folder")
    parser.add_argument("--quarter", type=float, default=0.25, help="share of each class's images to validate on (whole patients)")
    parser.add_argument("--by", choices=("sharpness", "batch"), default="sharpness",
                        help="sharpness: the conflict split; batch: a NORMAL batch held out")
    parser.add_argument("--held", choices=("NORMAL2", "IM"), default="NORMAL2",
                        help="with --by batch: which NORMAL batch validates (file name prefix)")
    args = parser.parse_args()
    if not all((args.data / name).is_dir() for name in CLASSES):
        print(f"no chest X-ray train folder at {args.data}: pass --data", file=sys.stderr)
        return 2
    if (args.out / "train").exists() or (args.out / "val").exists():
        print(f"{args.out} already holds a split: choose another folder", file=sys.stderr)
        return 2
    if args.by == "sharpness":
        made = make_split(args.data, args.out, args.quarter)
    else:
        made = make_batch_split(args.data, args.out, args.held)
    print(json.dumps(made, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

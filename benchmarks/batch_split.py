"""A validation split that holds out the chest X-ray set's second NORMAL batch (a benchmark tool).

    python3 benchmarks/batch_split.py OUT [--data DIR]

The shared train split's NORMAL images come in two acquisition batches, `IM-...` (597) and
`NORMAL2-IM-...` (744) (../shared/data/README.md). This trains on the `IM-` normals and two
thirds of the pneumonia patients and validates on every `NORMAL2-` normal and the other third
(every third patient in sorted order), as folders of symlinks:

    OUT/train/{NORMAL,PNEUMONIA}/...   ->  xferlearn train OUT/train ...
    OUT/val/{NORMAL,PNEUMONIA}/...     ->  python3 benchmarks/compare_runs.py A B OUT/val

A second shifted signal beside benchmarks/shift_split.py (sharpness): a milder shift (the
linear recipe reads about 0.99 here), so that a recipe chosen on one split can be checked on
another. Made from the train folder alone; it is a development signal, never a test figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from xferlearn.data.folders import patient_id  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224" / "train"


def side_of(path: Path, name: str, patients: list[str]) -> str:
    if name == "NORMAL":
        return "val" if path.name.startswith("NORMAL2-") else "train"
    return "val" if patients.index(patient_id(path.name) or path.name) % 3 == 0 else "train"


def make_split(data: Path, out: Path) -> dict:
    counts: dict = {"train": {}, "val": {}, "dropped_duplicates": 0}
    placed = []
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted(p for p in (data / name).iterdir() if p.is_file())
        patients = sorted({patient_id(p.name) or p.name for p in files})
        placed += [(path, name, side_of(path, name, patients)) for path in files]
    digest = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path, _, _ in placed}
    val_digests = {digest[path] for path, _, side in placed if side == "val"}
    for path, name, side in placed:
        if side == "train" and digest[path] in val_digests:  # a byte-identical copy of a validation image
            counts["dropped_duplicates"] += 1
            continue
        (out / side / name).mkdir(parents=True, exist_ok=True)
        (out / side / name / path.name).symlink_to(path.resolve())
        counts[side][name] = counts[side].get(name, 0) + 1
    record = {"data": str(data), "how": "NORMAL2- normals and every third pneumonia patient validate", **counts}
    (out / "split.json").write_text(json.dumps(record, indent=2))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write train/ and val/ (symlinks) into")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the chest X-ray train folder")
    args = parser.parse_args()
    if not all((args.data / name).is_dir() for name in ("NORMAL", "PNEUMONIA")):
        print(f"no chest X-ray train folder at {args.data}: pass --data", file=sys.stderr)
        return 2
    if (args.out / "train").exists() or (args.out / "val").exists():
        print(f"{args.out} already holds a split: choose another folder", file=sys.stderr)
        return 2
    print(json.dumps(make_split(args.data, args.out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

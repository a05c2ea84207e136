"""Build the chest X-ray sample that ships inside the package (xferlearn.datasets).

    python3 tools/make_sample.py                       # from ../shared/data, into src/xferlearn/datasets/
    python3 tools/make_sample.py --source DIR --quality 90

Picks whole patients at random (seeded) from the Kaggle *train* split, the same number of
images from each class, and splits them by patient into train/ and test/ (no patient on
both sides). Files whose bytes duplicate another file of the source are left out, so no
image can sit on both sides either. Each image is re-encoded as an 8-bit grayscale JPEG
at 224 px (the X-rays are grayscale; the source stores them as RGB) under its own file
name, which carries its patient. SOURCES.csv records every pick: the sample file, its part,
class, patient and the source file it came from with that file's SHA-256.

Only this script reads ../shared; the package never does. Rerunning it with the same
source, seed and quality writes the same files (given the same Pillow/libjpeg).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from xferlearn.data.folders import patient_id  # noqa: E402  (the one definition of a patient)

CLASSES = ("NORMAL", "PNEUMONIA")
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "chest_xray_224" / "train"
DEFAULT_DEST = ROOT / "src" / "xferlearn" / "datasets" / "chest_xray_sample"
# Written beside the images, so that a copy of the folder carries its credit (CC BY 4.0 asks
# for the creators, the licence, and a note of what was changed).
LICENSE = """Chest X-ray sample shipped with xferlearn ({n} images: train/ and test/, each NORMAL/ and PNEUMONIA/)

Source: Kermany, D., Zhang, K., Goldbaum, M. (2018). "Labeled Optical Coherence Tomography (OCT)
and Chest X-Ray Images for Classification". Mendeley Data, v2. doi:10.17632/rscbjbr9sj.2
Paper: Kermany, D. S. et al. (2018). "Identifying Medical Diagnoses and Treatable Diseases by
Image-Based Deep Learning". Cell 172(5), 1122-1131.e9. doi:10.1016/j.cell.2018.02.010

Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/ . This licence covers these images; xferlearn's
own code is under its own licence (Apache-2.0).

Changes made: {n} images picked at random, by whole patient, from the "train" split of the
Kaggle release ("Chest X-Ray Images (Pneumonia)") of the set above; resized to 224x224 px and
re-encoded as 8-bit grayscale JPEG (quality {quality}); split by patient into train/ and test/
(no patient in both). SOURCES.csv lists each image's source file and its SHA-256. Made by
tools/make_sample.py in the xferlearn repository (seed {seed}).

For demonstration only: not for diagnosis. test/ comes from the same source as train/, so
figures measured on it are in-distribution and say nothing about other hospitals or machines.
"""


def take_patients(patients: list[tuple[str, list[Path]]], wanted: int) -> tuple[list, list]:
    """Whole patients, in the given order, whose images add up to exactly `wanted` (a patient
    that would overshoot is passed over); returns (taken, the rest)."""
    taken, rest, count = [], [], 0
    for patient, files in patients:
        if count + len(files) <= wanted and count < wanted:
            taken.append((patient, files))
            count += len(files)
        else:
            rest.append((patient, files))
    if count != wanted:
        raise SystemExit(f"could not take exactly {wanted} images by whole patients (got {count})")
    return taken, rest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the Kaggle train split (224 px)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="replaced entirely")
    parser.add_argument("--per-class", type=int, default=100, help="images per class in all (default: 100)")
    parser.add_argument("--test-per-class", type=int, default=30, help="of those, in test/ (default: 30)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90: the 200 images take 1.5 MB)")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        raise SystemExit(f"{args.source} not found: this script needs the shared data folder")

    files = {name: sorted((args.source / name).iterdir()) for name in CLASSES}
    digests = {path: hashlib.sha256(path.read_bytes()).hexdigest() for paths in files.values() for path in paths}
    copies = defaultdict(int)
    for digest in digests.values():
        copies[digest] += 1

    rng = np.random.default_rng(args.seed)
    picks = []  # (part, class, patient, source path)
    for name in CLASSES:
        by_patient = defaultdict(list)
        for path in files[name]:
            if copies[digests[path]] == 1:  # every copy of a duplicated image is left out
                by_patient[patient_id(path.name) or path.name].append(path)
        patients = sorted(by_patient.items())
        order = rng.permutation(len(patients))
        chosen, _ = take_patients([patients[i] for i in order], args.per_class)
        test, train = take_patients(chosen, args.test_per_class)
        for part, group in (("train", train), ("test", test)):
            picks += [(part, name, patient, path) for patient, paths in group for path in paths]

    if args.dest.exists():
        shutil.rmtree(args.dest)
    rows = []
    for part, name, patient, path in sorted(picks):
        out = args.dest / part / name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        with Image.open(path) as image:
            image.convert("L").save(buffer, "JPEG", quality=args.quality, optimize=True)
        out.write_bytes(buffer.getvalue())
        rows.append({"file": f"{part}/{name}/{path.name}", "part": part, "class": name, "patient": patient,
                     "source": f"chest_xray/train/{name}/{path.name}", "source_sha256": digests[path]})
    with open(args.dest / "SOURCES.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    (args.dest / "LICENSE.txt").write_text(LICENSE.format(n=len(rows), quality=args.quality, seed=args.seed))

    total = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    counts = defaultdict(int)
    for row in rows:
        counts[row["part"], row["class"]] += 1
    patients = {part: len({r["patient"] for r in rows if r["part"] == part}) for part in ("train", "test")}
    print(f"{len(rows)} images, {dict(counts)}, patients {patients}, quality {args.quality}: "
          f"{total / 1e6:.2f} MB ({total} bytes) in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

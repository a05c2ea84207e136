"""The packaged chest X-ray sample: its shape, its patient split, its size budget, its credit,
and that a built wheel carries it."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

import xferlearn
from xferlearn.data.folders import patient_id
from xferlearn.datasets import chest_xray_sample

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"train": 70, "test": 30}  # images per class
BUDGET = 5 * 2**20  # the "at most 5 MB"


def images(part: str | None = None) -> list[Path]:
    root = chest_xray_sample() / part if part else chest_xray_sample()
    return sorted(p for p in root.rglob("*.jpeg"))


def test_sample_has_both_parts_and_classes_as_224px_grayscale():
    root = chest_xray_sample()
    assert root == xferlearn.datasets.chest_xray_sample()  # reachable from a plain `import xferlearn`
    for part, per_class in PARTS.items():
        for name in ("NORMAL", "PNEUMONIA"):
            files = list((root / part / name).iterdir())
            assert len(files) == per_class, (part, name)
    for path in images():
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "L", (224, 224)), path


def test_sample_is_split_by_patient_with_no_duplicate_across():
    patients = {part: {patient_id(p.name) for p in images(part)} for part in PARTS}
    assert None not in patients["train"] | patients["test"]  # every file names its patient
    assert patients["train"] & patients["test"] == set()
    digests = {part: {hashlib.sha256(p.read_bytes()).digest() for p in images(part)} for part in PARTS}
    assert digests["train"] & digests["test"] == set()
    assert len(digests["train"]) + len(digests["test"]) == len(images())


def test_sample_fits_the_size_budget():
    total = sum(p.stat().st_size for p in chest_xray_sample().rglob("*") if p.is_file())
    assert total <= BUDGET, f"{total / 2**20:.2f} MiB"


def test_sample_carries_its_credit_and_sources():
    root = chest_xray_sample()
    licence = (root / "LICENSE.txt").read_text()
    for needed in ("Kermany", "doi:10.17632/rscbjbr9sj.2", "Cell 172(5)", "CC BY 4.0",
                   "creativecommons.org/licenses/by/4.0", "Changes made", "in-distribution"):
        assert needed in licence, needed
    with open(root / "SOURCES.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["file"] for row in rows) == sorted(str(p.relative_to(root)) for p in images())
    assert all(row["source"].startswith("chest_xray/train/") for row in rows)


def test_wheel_carries_the_sample_and_its_licence(tmp_path):
    """`pip wheel` on a copy of the project (builds write build/ and egg-info beside the
    sources), offline: no index, no build isolation (setuptools is already installed). ~15 s."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
                             "--no-index", "--quiet", "-w", str(tmp_path / "dist")],
                            cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("xferlearn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    prefix = "xferlearn/datasets/chest_xray_sample/"
    assert {str(p.relative_to(chest_xray_sample().parent.parent.parent)) for p in images()} <= names
    assert {prefix + "LICENSE.txt", prefix + "SOURCES.csv", "xferlearn/datasets/__init__.py"} <= names

"""Shared fixtures: synthetic image folders, a tiny trained run, and the real data where present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# cv=0: the tiny runs hold a validation split out (what most tests read back); the tests of
# cross-fitting (tests/training/test_crossfit.py) turn it on.
TINY = dict(backbone="resnet18", weights="none", image_size=64, epochs=2, views=0, lr=0.01, cv=0)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets caches of its own (and never writes into the user's ~/.cache)."""
    monkeypatch.setenv("XFERLEARN_CACHE", str(tmp_path_factory.mktemp("cache")))


def synthetic_image(label: int, index: int, size: int = 48) -> Image.Image:
    """Class 0: a dark field with a faint blob; class 1: a bright blob. Easy for any backbone."""
    rng = np.random.default_rng(1000 * label + index)
    image = rng.normal(60, 12, (size, size)).clip(0, 255)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2))
    image += blob * (170 if label else 25)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def make_folder(root: Path, classes=("NORMAL", "PNEUMONIA"), per_class: int = 14, patients: bool = True) -> Path:
    """A folder-per-class tree of synthetic JPEGs; with `patients`, Kaggle-style names, 2 images a patient."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if patients and name == "PNEUMONIA":
                filename = f"person{i // 2}_bacteria_{i}.jpeg"
            elif patients:
                filename = f"IM-{i // 2:04d}-{i % 2 + 1:04d}.jpeg"
            else:
                filename = f"{name.lower()}_{i}.jpeg"
            synthetic_image(label, i).save(root / name / filename, quality=95)
    return root


def link_real_slice(shared_data: Path, dest: Path, per_class: int) -> Path:
    """A folder of symlinks to the first `per_class` real X-rays of each class of the shared train split."""
    for name in ("NORMAL", "PNEUMONIA"):
        (dest / name).mkdir(parents=True)
        for source in sorted((shared_data / "chest_xray_224" / "train" / name).iterdir())[:per_class]:
            (dest / name / source.name).symlink_to(source)
    return dest


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny trained run shared by the read-only tests (predict, evaluate, export...)."""
    from xferlearn import train

    base = tmp_path_factory.mktemp("tiny")
    data = make_folder(base / "data", per_class=16)
    result = train(data=str(data), out=str(base / "run"), cache_dir=str(base / "cache"), **TINY)
    return result.run_dir


@pytest.fixture(scope="session")
def normal_positive_run(tiny_run) -> Path:
    """The tiny run's data trained with NORMAL, the first class, as the positive one."""
    from xferlearn import train

    out = tiny_run.parent / "run-normal-positive"
    return train(data=str(tiny_run.parent / "data"), out=str(out), cache_dir=str(tiny_run.parent / "cache"),
                 positive_class="NORMAL", **TINY).run_dir


@pytest.fixture(scope="session")
def tiny_data(tiny_run) -> Path:
    return tiny_run.parent / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "chest_xray_224" / "train").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only the project's own CI and developer machines have it)")
    return SHARED_DATA

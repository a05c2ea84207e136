"""From a folder on disk to a checked manifest and a leak-free validation split.

`scan` reads every file under a folder-per-class root once: it hashes the bytes, decodes
them through the `DecodeCache` (which proves the file is an image and fills the cache
for every later epoch), and lists what it could not read with the reason. Exact
duplicates are kept once. `split_validation` then carves validation out of train,
stratified by class and grouped by patient, so that no patient and no duplicate image
sits on both sides.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._io import content_hash, write_json
from ..errors import XferlearnError
from .augment import augmented, to_tensor, view_seed
from .images import IMAGE_EXTENSIONS, DecodeCache, UnreadableImage

# Kaggle chest X-ray names: personN_bacteria_M / personN_virus_M, IM-XXXX-000Y, NORMAL2-IM-XXXX-000Y.
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^(NORMAL2-IM-\d+)-"),
    re.compile(r"^(IM-\d+)-"),
)


def patient_id(filename: str) -> str | None:
    """The patient a file name carries, or None where it carries none."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(filename)
        if match:
            return match.group(1)
    return None


@dataclass
class Sample:
    path: str
    label: int
    digest: str
    patient: str | None


@dataclass
class Manifest:
    root: str
    classes: list[str]
    samples: list[Sample]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, kept copy)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.samples]

    @property
    def digests(self) -> list[str]:
        return [s.digest for s in self.samples]

    def counts(self) -> dict[str, int]:
        labels = self.labels
        return {name: int((labels == i).sum()) for i, name in enumerate(self.classes)}


def class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise XferlearnError(f"{root} is not a folder.")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class Layout:
    """Where the images are: the class roots pooled for training, and a test root if any."""
    train_roots: list[Path]
    test_root: Path | None
    classes: list[str]


def find_layout(root: str | Path) -> Layout:
    """A folder of class folders, or a Kaggle-style root holding train/ [val/] [test/].

    The Kaggle val/ (16 images) is too small to choose anything on, so it is pooled with
    train/ and a proper validation split is carved from both.
    """
    root = Path(root)
    if not root.exists():
        raise XferlearnError(f"{root} does not exist.")
    if (root / "train").is_dir():
        train_roots = [root / "train"] + ([root / "val"] if (root / "val").is_dir() else [])
        test_root = root / "test" if (root / "test").is_dir() else None
    else:
        train_roots, test_root = [root], None
    classes = class_folders(train_roots[0])
    for other in train_roots[1:] + ([test_root] if test_root else []):
        check_same_classes(classes, class_folders(other), other)
    if not classes:
        raise XferlearnError(f"{train_roots[0]} has no class folders: put each class's images in a subfolder named after it.")
    if len(classes) < 2:
        raise XferlearnError(f"{train_roots[0]} has a single class folder ({classes[0]}): a classifier needs at least two.")
    return Layout(train_roots, test_root, classes)


def check_same_classes(expected: list[str], found: list[str], where: Path | str) -> None:
    if list(found) != list(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise XferlearnError(
            f"{where} has classes {found}, but the model knows {expected}"
            + (f" (missing: {missing})" if missing else "") + (f" (unknown: {extra})" if extra else "") + ".")


def expand_paths(inputs) -> list[Path]:
    """Files as given, folders walked for image files (sorted, so output order is stable)."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if _is_file_or_dangling(p)
                            and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(item)
    return paths


def _is_file_or_dangling(path: Path) -> bool:
    """A file, or a link that leads nowhere (a loop, a missing target): listed, so that reading it
    reports it as unreadable rather than it vanishing without a word."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _list_files(class_root: Path) -> list[Path]:
    return sorted(p for p in class_root.rglob("*") if _is_file_or_dangling(p))


def scan(roots: str | Path | list, cache: DecodeCache, classes: list[str] | None = None,
         workers: int | None = None, dedupe: bool = True) -> Manifest:
    """Read, hash and decode every file under the class folders of `roots`.

    `classes` pins the class list (evaluation must use the model's); otherwise it comes
    from the folder names. Unreadable files are listed with reasons, never silently dropped.
    `dedupe=False` keeps exact duplicates (an evaluation counts every file it is given).
    """
    roots = [Path(r) for r in (roots if isinstance(roots, (list, tuple)) else [roots])]
    found = class_folders(roots[0])
    if classes is None:
        classes = found
    for root in roots:
        check_same_classes(classes, class_folders(root), root)
    if not classes:
        raise XferlearnError(f"{roots[0]} has no class folders: put each class's images in a subfolder named after it.")

    jobs = [(path, label) for root in roots for label, name in enumerate(classes)
            for path in _list_files(root / name)]

    def read(job):
        path, label = job
        try:
            data = path.read_bytes()
        except OSError as error:
            return path, label, None, f"cannot read file: {error.strerror or error}"
        digest = content_hash(data)
        try:
            if not cache.contains(digest):
                cache.put(data, digest)
        except UnreadableImage as error:
            return path, label, None, str(error)
        return path, label, digest, None

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(read, jobs))

    manifest = Manifest(str(roots[0]), list(classes), [])
    first_seen: dict[str, Sample] = {}
    conflicting: set[str] = set()
    for path, label, digest, reason in results:
        if reason is not None:
            manifest.unreadable.append((str(path), reason))
            continue
        if digest in first_seen and dedupe:
            kept = first_seen[digest]
            if kept.label != label:
                conflicting.add(digest)
            manifest.duplicates.append((str(path), kept.path))
            continue
        sample = Sample(str(path), label, digest, patient_id(path.name))
        first_seen[digest] = sample
        manifest.samples.append(sample)
    for digest in conflicting:  # the same image under two classes: its label cannot be trusted
        sample = first_seen[digest]
        manifest.samples.remove(sample)
        manifest.unreadable.append((sample.path, "the same image also appears under another class"))
    counts = manifest.counts()
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise XferlearnError(f"No readable images for class(es) {empty} under {roots[0]}"
                             + (f" ({len(manifest.unreadable)} unreadable files)." if manifest.unreadable else "."))
    return manifest


def split_validation(manifest: Manifest, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices of (train, val) and a description of how they were made.

    Stratified by class, grouped by patient where file names carry one (else each file is
    its own group), via scikit-learn's StratifiedGroupKFold with one fold held out.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = manifest.labels
    groups = [s.patient or s.digest for s in manifest.samples]
    with_patient = sum(s.patient is not None for s in manifest.samples)
    n_splits = max(2, round(1 / val_fraction))
    if np.bincount(labels).min() < n_splits:
        raise XferlearnError(f"Too few images to carve a validation split: each class needs at least {n_splits} "
                             f"(have {manifest.counts()}).")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels, groups))
    how = (f"stratified by class, grouped by patient ({with_patient} of {len(labels)} files carry a patient id), "
           f"1/{n_splits} held out, seed {seed}; exact duplicates removed before splitting")
    return np.sort(train_idx), np.sort(val_idx), how


def save_split(path: Path, manifest: Manifest, train_idx, val_idx, how: str) -> None:
    record = {
        "how": how,
        "classes": manifest.classes,
        "train": [asdict(manifest.samples[i]) for i in train_idx],
        "val": [asdict(manifest.samples[i]) for i in val_idx],
        "unreadable": manifest.unreadable,
        "duplicates": manifest.duplicates,
    }
    write_json(path, record)


class ImageDataset:
    """Decoded images (through the cache) as (3, H, W) uint8 tensors with their labels.

    `transform` (a preset from augment.py) is applied with a seed per (image, view), so
    that an augmented view is reproducible; view 0 is always the image as it is.
    """

    def __init__(self, paths, digests, labels, cache: DecodeCache, transform=None, view: int = 0, seed: int = 0):
        self.paths, self.digests, self.labels = list(paths), list(digests), labels
        self.cache, self.transform, self.view, self.seed = cache, transform, view, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        array = self.cache.get(self.paths[index], self.digests[index])
        if self.transform is None or self.view == 0:
            image = to_tensor(array)
        else:
            image = augmented(array, self.transform, view_seed(self.digests[index], self.view, self.seed))
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label

"""From a folder on disk to a checked manifest and a leak-free validation split.

`scan` reads every file under a folder-per-class root once: it hashes the bytes, decodes
them through the `DecodeCache` (which proves the file is an image and fills the cache
for every later epoch), and lists what it could not read with the reason. Exact
duplicates are kept once. `split_validation` then carves validation out of train,
stratified by class and grouped by patient where file names carry one, so that no patient
and no duplicate image sits on both sides. A provided validation folder is used as it is
when it is large enough (`use_validation_folder`, in layout.py, which finds the folders).
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
from .images import DecodeCache, UnreadableImage, progress_bar
from .layout import check_same_classes, class_folder, class_folders, list_files
from .phash import dhash, remember

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

    def take(self, idx) -> tuple[list[str], list[str], np.ndarray]:
        """(paths, digests, labels) of the samples at `idx`, in one pass: the properties above
        build whole lists, so indexing them per sample is quadratic (hours at 100,000 images)."""
        chosen = [self.samples[i] for i in idx]
        return ([s.path for s in chosen], [s.digest for s in chosen],
                np.array([s.label for s in chosen], dtype=np.int64))

    def counts(self) -> dict[str, int]:
        labels = self.labels
        return {name: int((labels == i).sum()) for i, name in enumerate(self.classes)}


def folder_split(manifest: Manifest, val_root: Path, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a manifest scanned from train roots and `val_root`: val is what
    lies under `val_root` (an image also in train was kept once, on the train side). Refused
    when that leaves a class without training images, or copies of training images leave one
    with fewer than `minimum` validation images: a validation folder that is (partly) the
    training images leaves nothing apart. (A file unreadable there only makes it smaller.)"""
    inside = np.array([Path(s.path).is_relative_to(val_root) for s in manifest.samples])
    train_idx, val_idx = np.flatnonzero(~inside), np.flatnonzero(inside)
    count = lambda idx: dict(zip(manifest.classes, np.bincount(manifest.labels[idx],  # noqa: E731
                                                               minlength=len(manifest.classes)).tolist()))
    train_counts, val_counts = count(train_idx), count(val_idx)
    dropped = sum(Path(path).is_relative_to(val_root) and not Path(kept).is_relative_to(val_root)
                  for path, kept in manifest.duplicates)
    if min(train_counts.values()) == 0 or (dropped and min(val_counts.values()) < minimum):
        raise XferlearnError(f"{val_root} leaves training {train_counts} and validation {val_counts} images per class "
                             f"({dropped} of its files are copies of training images, kept on the training side; "
                             f"validation needs {minimum} a class): give a validation folder apart from the training "
                             "images (--val DIR, or DATA's val/), or none.")
    return train_idx, val_idx


VALIDATION_FOLDER = "the validation folder"  # how a split from a provided folder is described


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
            for path in list_files(root / class_folder(root, name))]

    def read(job):
        path, label = job
        try:
            data = path.read_bytes()
        except OSError as error:
            return path, label, None, f"cannot read file: {error.strerror or error}"
        digest = content_hash(data)
        try:
            if not cache.contains(digest):
                # Its perceptual hash while the decoded image is in hand (split.json and the leak
                # check need it; otherwise they would read every image back from the cache).
                decoded[digest] = dhash(cache.put(data, digest))
        except UnreadableImage as error:
            return path, label, None, str(error)
        return path, label, digest, None

    decoded: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(progress_bar(pool.map(read, jobs), len(jobs), "reading images"))
    remember(cache, decoded)

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


def groups(manifest: Manifest) -> list[str]:
    """The unit kept on one side of a split: the patient where the file name carries one, else the image."""
    return [s.patient or s.digest for s in manifest.samples]


def grouping(manifest: Manifest) -> str:
    """How `groups` grouped, in words: patients are mentioned only where some file carries one."""
    with_patient = sum(s.patient is not None for s in manifest.samples)
    if not with_patient:
        return "each image its own group"
    return f"grouped by patient ({with_patient} of {len(manifest.samples)} files carry a patient id)"


def split_validation(manifest: Manifest, val_fraction: float = 0.2, seed: int = 0, *, group_by: str | None = None,
                     groups_csv: str | None = None,
                     val_groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices of (train, val) and a description of how they were made.

    Stratified by class, grouped by patient where file names carry one (else each file is
    its own group), via scikit-learn's StratifiedGroupKFold with one fold held out. With
    `group_by` (a regex on file names) or `groups_csv`, whole acquisition groups are held
    out instead (groups.py): `val_groups` names them, else a grouped fold is drawn.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = manifest.labels
    if group_by or groups_csv:
        from .groups import assign_groups, split_by_groups

        acquisition = assign_groups(manifest.paths, manifest.root, group_by, groups_csv)
        train_idx, val_idx, how = split_by_groups(labels, acquisition, groups(manifest), val_groups, val_fraction,
                                                  seed)
        return train_idx, val_idx, how + "; exact duplicates removed before splitting"
    if val_groups:
        raise XferlearnError("--val-groups names groups: give --group-by REGEX or --groups CSV to define them.")
    n_splits = max(2, round(1 / val_fraction))
    if np.bincount(labels).min() < n_splits:
        raise XferlearnError(f"Too few images to carve a validation split: each class needs at least {n_splits} "
                             f"(have {manifest.counts()}).")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels, groups(manifest)))
    how = (f"stratified by class, {grouping(manifest)}, 1/{n_splits} held out, seed {seed}; exact duplicates "
           "removed before splitting")
    return np.sort(train_idx), np.sort(val_idx), how


def from_validation_folder(how: str) -> bool:
    """Whether a split's description (`how`, as saved in split.json) is a provided validation folder's."""
    return how.startswith(VALIDATION_FOLDER)


def save_split(path: Path, manifest: Manifest, train_idx, val_idx, how: str, phashes: list[str] | None = None) -> None:
    """RUN/split.json: every training and validation image with its content hash and, where
    given (one per sample), its perceptual hash, so `evaluate` can find overlaps without the files."""
    def entry(i):  # absolute paths: later commands (stress --split val, int8) run from anywhere
        sample = asdict(manifest.samples[i]) | {"path": os.path.abspath(manifest.samples[i].path)}
        return sample | ({"phash": phashes[i]} if phashes else {})

    record = {
        "how": how,
        "classes": manifest.classes,
        "train": [entry(i) for i in train_idx],
        "val": [entry(i) for i in val_idx],
        "unreadable": manifest.unreadable,
        "duplicates": manifest.duplicates,
    }
    write_json(path, record)


def is_cross_fitted(split: dict) -> bool:
    """Whether a split.json record is a cross-fitted run's: no validation images held apart,
    every image trained the final model and out-of-fold predictions chose its threshold."""
    return not split.get("val") and "cross-fitting" in str(split.get("how", ""))


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
        # Here, not at the top: listing and expanding folders (predict on an ONNX engine) must not import torch.
        from .augment import augmented, to_tensor, view_seed
        from .contrast import equalize, equalize_tensor

        array = self.cache.get(self.paths[index], self.digests[index])
        if self.transform is None or self.view == 0:
            image = to_tensor(equalize(array, self.cache.contrast))
        else:  # the contrast step after augmentation, as it would meet a new device's image
            image = equalize_tensor(augmented(array, self.transform, view_seed(self.digests[index], self.view,
                                                                                  self.seed)), self.cache.contrast)
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label

"""Acquisition groups: validating on whole batches, sites or scanners the model did not train on.

A random patient-disjoint split measures the model on images from the same sources as its
training images; on the chest X-ray set it saturates (AUC 0.99+) and says nothing about a
new source. Naming groups (`--group-by REGEX` on file names, or `--groups CSV` with columns
file,group) holds out *whole* groups: `--val-groups A,B` names the validation groups, else
scikit-learn's StratifiedGroupKFold holds out about `val_fraction` of them. Patients stay on
one side: a training image whose patient also appears in validation is left out of training.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .._io import read_csv_rows
from ..errors import XferlearnError


def compile_group_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise XferlearnError(f"--group-by {pattern!r} is not a regular expression ({error}).") from None


def group_of(filename: str, pattern: re.Pattern) -> str | None:
    """The first capture group of the first match in `filename` (the whole match if the
    pattern has no group), or None where the name does not match."""
    match = pattern.search(filename)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def read_group_table(path: str | Path) -> dict[str, str]:
    """A CSV with columns file,group: file as a name, a path relative to the data folder, or a full path."""
    if not Path(path).is_file():
        raise XferlearnError(f"--groups {path}: no such file; give a CSV with columns file,group.")
    rows = read_csv_rows(path)
    if not rows or not {"file", "group"} <= set(rows[0]):
        raise XferlearnError(f"--groups {path} needs a header with columns file,group (and one row per image).")
    return {row["file"].strip(): row["group"].strip() for row in rows if row.get("file") and row.get("group")}


def assign_groups(paths: list[str], root: str, group_by: str | None = None, groups_csv: str | None = None) -> list[str]:
    """One group name per path, from a file-name pattern or a CSV table; every file must have one."""
    if group_by and groups_csv:
        raise XferlearnError("give either --group-by or --groups, not both.")
    found: list[str | None] = []
    if group_by:
        pattern = compile_group_pattern(group_by)
        found = [group_of(Path(p).name, pattern) for p in paths]
        source = f"--group-by {group_by!r}"
    else:
        table = read_group_table(groups_csv)
        for p in paths:
            path = Path(p)
            keys = (str(path), str(path.relative_to(root)) if path.is_relative_to(root) else None, path.name)
            found.append(next((table[k] for k in keys if k in table), None))
        source = f"--groups {groups_csv}"
    missing = [p for p, g in zip(paths, found) if not g]
    if missing:
        raise XferlearnError(f"{len(missing)} of {len(paths)} images have no group under {source}, "
                             f"e.g. {Path(missing[0]).name}; every image needs one.")
    return [str(g) for g in found]


def split_by_groups(labels: np.ndarray, groups: list[str], patients: list[str], val_groups: list[str] | None,
                    val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, val) indices holding out whole groups, and how they were chosen."""
    from sklearn.model_selection import StratifiedGroupKFold

    names = sorted(set(groups))
    group_array = np.array(groups)
    if val_groups:
        unknown = sorted(set(val_groups) - set(names))
        if unknown:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise XferlearnError(f"--val-groups names {unknown}, which no image belongs to; the groups are: {shown}.")
        is_val = np.isin(group_array, list(val_groups))
        if is_val.all():
            raise XferlearnError("--val-groups names every group: leave at least one group to train on.")
        how = f"the groups {sorted(set(val_groups))} held out for validation"
    else:
        if len(names) < 2:
            raise XferlearnError(f"every image is in one group ({names[0]!r}): validation needs at least two groups.")
        n_splits = min(max(2, round(1 / val_fraction)), len(names))
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, val_idx = next(splitter.split(np.zeros(len(labels)), labels, group_array))
        is_val = np.zeros(len(labels), dtype=bool)
        is_val[val_idx] = True
        held = sorted(set(group_array[is_val]))
        how = (f"whole groups held out ({len(held)} of {len(names)}: {', '.join(held[:6])}"
               f"{', ...' if len(held) > 6 else ''}), stratified by class, 1/{n_splits}, seed {seed}")
    # A patient seen in validation must not train: drop its images from the training side.
    val_patients = {p for p, v in zip(patients, is_val) if v}
    is_train = ~is_val & ~np.isin(np.array(patients), list(val_patients))
    dropped = int((~is_val & ~is_train).sum())
    for side, mask in (("validation", is_val), ("training", is_train)):
        present = set(labels[mask].tolist())
        if len(present) < len(set(labels.tolist())):
            raise XferlearnError(f"the {side} side of the group split lacks a class (it has only labels "
                                 f"{sorted(present)}): choose groups that hold every class on both sides.")
    how += (f"; {dropped} training images left out because their patient is in validation" if dropped else "")
    return np.flatnonzero(is_train), np.flatnonzero(is_val), how

"""Where the images are: a folder of class folders, or a root holding train/ [val/] [test/].

`find_layout` finds the training root, a validation folder (val/, valid/ or validation/, or
`--val`) and a test root, and checks that they hold the same class folders (in either Unicode
form: macOS writes decomposed names). `count_images` and `training_files` look at file names
only, before anything is read; `check_outside` keeps an output folder out of the images that
later commands read as classes.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..errors import XferlearnError
from .images import IMAGE_EXTENSIONS


def class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise XferlearnError(f"{root} is not a folder.")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class Layout:
    """Where the images are: the class roots for training, a validation folder and a test root if any."""
    train_roots: list[Path]
    test_root: Path | None
    classes: list[str]
    val_root: Path | None = None


# What published datasets call their validation folder: PyTorch's tutorials and Kaggle val/,
# Roboflow and many Kaggle sets valid/, TensorFlow's cats_and_dogs_filtered validation/.
VALIDATION_FOLDERS = ("val", "valid", "validation")


def find_layout(root: str | Path, val: str | Path | None = None) -> Layout:
    """A folder of class folders, or a root holding train/ [val/] [test/]; `val` names a
    validation folder explicitly (else ROOT's val/, valid/ or validation/ where ROOT holds train/).
    Whether that folder is large enough to validate on is `use_validation_folder`'s call."""
    root = Path(root)
    if not root.exists():
        raise XferlearnError(f"{root} does not exist.")
    if (root / "train").is_dir():
        train_roots = [root / "train"]
        found = [root / name for name in VALIDATION_FOLDERS if (root / name).is_dir()]
        if len(found) > 1 and val is None:
            raise XferlearnError(f"{root} holds {' and '.join(p.name + '/' for p in found)}: name the validation "
                                 "folder with --val.")
        val_root = found[0] if found else None
        test_root = root / "test" if (root / "test").is_dir() else None
    else:
        train_roots, val_root, test_root = [root], None, None
    if val is not None:
        val_root = Path(val)
        if not val_root.is_dir():
            raise XferlearnError(f"--val {val_root} is not a folder of class folders.")
    classes = class_folders(train_roots[0])
    if not classes:
        raise XferlearnError(f"{train_roots[0]} has no class folders: put each class's images in a subfolder named after it.")
    if len(classes) < 2:
        raise XferlearnError(f"{train_roots[0]} has a single class folder ({classes[0]}): a classifier needs at least two.")
    for other in [r for r in (val_root, test_root) if r]:
        check_same_classes(classes, class_folders(other), other, f"{train_roots[0]} has")
    return Layout(train_roots, test_root, classes, val_root)


def training_files(layout: Layout) -> list[Path]:
    """Every file under the training roots' class folders, in scan order."""
    return [path for root in layout.train_roots for name in layout.classes
            for path in list_files(root / class_folder(root, name))]


def count_images(root: Path, classes: list[str]) -> dict[str, int]:
    """Image files per class folder, by extension (cheap: nothing is read)."""
    return {name: sum(p.suffix.lower() in IMAGE_EXTENSIONS for p in list_files(root / class_folder(root, name)))
            for name in classes}


def use_validation_folder(counts: dict[str, int], minimum: int) -> tuple[bool, str]:
    """Whether a provided validation folder is the validation split (each class has at least
    `minimum` images) or is pooled into train (fewer: too few to choose a threshold on), and why."""
    smallest = min(counts, key=counts.get)
    if counts[smallest] >= minimum:
        return True, (f"every class has at least {minimum} images there (smallest: {smallest}, "
                      f"{counts[smallest]})")
    return False, (f"{smallest} has {counts[smallest]} images there, fewer than the {minimum} a class needs "
                   "to choose a threshold on")


def check_outside(out: str | Path, roots) -> None:
    """One line when an output folder would lie inside folders of images that get scanned: its
    files would be read as a class of their own (or as images of one) the next time."""
    target = Path(out).resolve()
    for root in roots:
        if root is not None and target.is_relative_to(Path(root).resolve()):
            raise XferlearnError(f"--out {out} lies inside the images in {root}: its files would be read as a class "
                                 "of their own; choose a folder outside it.")


def _nfc(names) -> list[str]:
    return [unicodedata.normalize("NFC", name) for name in names]


def class_folder(root: Path, name: str) -> str:
    """The folder of class `name` under `root`, as the file system spells it: macOS writes
    decomposed Unicode (NFD) where a model trained elsewhere may hold the composed form."""
    if (root / name).is_dir():
        return name
    return next((f for f in class_folders(root) if _nfc([f]) == _nfc([name])), name)


def check_same_classes(expected: list[str], found: list[str], where: Path | str,
                       expected_from: str = "the model knows") -> None:
    if sorted(_nfc(found)) != sorted(_nfc(expected)):  # the same names, in either Unicode form
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise XferlearnError(
            f"{where} has classes {found}, but {expected_from} {expected}"
            + (f" (missing: {missing})" if missing else "") + (f" (unknown: {extra})" if extra else "") + ".")


def expand_paths(inputs) -> list[Path]:
    """Files as given, folders walked for image files (sorted, so output order is stable)."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if is_file_or_dangling(p)
                            and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(item)
    return paths


def is_file_or_dangling(path: Path) -> bool:
    """A file, or a link that leads nowhere (a loop, a missing target): listed, so that reading it
    reports it as unreadable rather than it vanishing without a word."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def list_files(class_root: Path) -> list[Path]:
    return sorted(p for p in class_root.rglob("*") if is_file_or_dangling(p))

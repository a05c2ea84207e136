"""The run folder's schema: one place that names every file a run holds.

    RUN/model.pt                     the self-describing checkpoint (models/checkpoint.py)
    RUN/config.json                  the resolved TrainConfig
    RUN/split.json                   the manifest of the training and validation images
    RUN/validation_metrics.json      validation figures at the chosen operating point
    RUN/validation_predictions.csv   per validation image: file, label, probabilities
    RUN/logs/[STAGE/]metrics.csv     training curves (Lightning's CSV logger)
    RUN/lightning/[STAGE/]last.ckpt  Lightning's checkpoints, for --resume
    RUN/stages/STAGE.pt              finished fine-tune stages, for --resume
    RUN/export/                      ONNX / TorchScript exports and their model.json
    RUN/metrics.json, report.md, *.png, gallery/   the latest `evaluate`
    RUN/stress/                      the latest `stress` test
    RUN/explanations/                Grad-CAM PNGs that `xferlearn demo` writes
    RUN/calibration.json             where `xferlearn calibrate` re-chose the operating point, and what changed
    RUN/identity.json                what run this is (config, data, split): --resume checks it
    RUN/.lock                        the writer lock (runlock.py), holder's pid and host

Every command finds its files through `RunDir`; none spells a file name itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ._io import read_csv_rows, write_csv_rows
from .errors import XferlearnError

CHECKPOINT = "model.pt"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", as_path(root))

    @classmethod
    def of(cls, run_or_checkpoint: str | Path) -> "RunDir":
        """The run folder of a run folder, or of a checkpoint file given directly."""
        path = as_path(run_or_checkpoint)
        return cls(path.parent if path.is_file() or path.suffix == ".pt" else path)

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def validation_metrics(self) -> Path:
        return self.root / "validation_metrics.json"

    @property
    def validation_predictions(self) -> Path:
        return self.root / "validation_predictions.csv"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def stress(self) -> Path:
        return self.root / "stress"

    @property
    def explanations(self) -> Path:
        return self.root / "explanations"

    @property
    def identity(self) -> Path:
        return self.root / "identity.json"

    def lock(self, command: str | None = None):
        """Context manager: hold the run's writer lock (runlock.py) for a whole command."""
        from .runlock import run_lock

        return run_lock(self.root, command)

    def lock_writes_to(self, folder: str | Path | None, command: str | None = None):
        """The run's lock when `folder` (None: the run itself) lies inside the run; else nothing to hold."""
        from contextlib import nullcontext

        folder = Path(folder) if folder is not None else self.root
        try:
            inside = folder.resolve().is_relative_to(self.root.resolve())
        except OSError:
            inside = True
        return self.lock(command) if inside and self.root.is_dir() else nullcontext()

    def resumable(self) -> list[Path]:
        """What an interrupted run leaves for --resume: Lightning checkpoints, finished stages, logs."""
        return [self.root / "lightning", self.root / "stages", self.root / "logs"]

    def history(self, stage: str = "") -> Path:
        return self.root / "logs" / stage / "metrics.csv"

    def logs(self) -> Path:
        return self.root / "logs"

    def lightning(self, stage: str = "") -> Path:
        return self.root / "lightning" / stage

    def stage(self, name: str) -> Path:
        return self.root / "stages" / f"{name}.pt"


def as_path(value, what: str = "a run") -> Path:
    """A path given as str or Path; anything else is one line, not a TypeError from deep inside."""
    if not isinstance(value, (str, os.PathLike)):
        raise XferlearnError(f"{what} is a folder or file path (str or Path), not {type(value).__name__} {value!r}.")
    return Path(value)


def checkpoint_path(run: str | Path) -> Path:
    """A run folder's checkpoint, or the checkpoint file itself when given one."""
    run = as_path(run)
    return run / CHECKPOINT if run.is_dir() else run


def read_history(path: Path) -> list[dict]:
    """A Lightning metrics.csv as rows (empty where there is none yet)."""
    return read_csv_rows(path)


def write_history(path: Path, rows: list[dict]) -> None:
    write_csv_rows(path, rows)

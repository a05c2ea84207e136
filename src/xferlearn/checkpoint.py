"""The self-describing checkpoint: everything predict, explain, export and serve need.

One file, `model.pt` in the run folder, holds the architecture, the weights' origin, the
preprocessing, the class names, the decision threshold and where it came from, the
temperature, the config, the validation metrics, the library versions and the state
dict. It holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never runs code from it. It is
written atomically, so a crash or a full disk leaves the previous one whole.
"""

from __future__ import annotations

import errno
import io
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import XferlearnError
from .images import atomic_write_bytes

FORMAT = "xferlearn-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.pt"


def library_versions() -> dict[str, str]:
    import timm

    from . import __version__
    return {"xferlearn": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


@dataclass
class Checkpoint:
    arch: str                       # timm architecture
    backbone: str                   # the name the user asked for
    weights: str                    # where the pretrained weights came from (tag)
    preprocessing: dict             # backbones.Preprocessing.to_dict()
    classes: list[str]
    positive_index: int | None      # binary: the class the threshold applies to; None for multi-class
    threshold: float | None
    threshold_source: str
    state_dict: dict
    temperature: float = 1.0
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tta: bool = False                # the threshold was chosen on test-time-augmented probabilities
    class_prior: list[float] | None = None  # the class prior the probabilities refer to (for --prevalence)
    versions: dict = field(default_factory=library_versions)

    @property
    def positive_class(self) -> str | None:
        return None if self.positive_index is None else self.classes[self.positive_index]

    def build_model(self) -> torch.nn.Module:
        """The trained network, rebuilt from the architecture name and the stored weights alone."""
        from .backbones import create_empty

        model = create_empty(self.arch, len(self.classes))
        model.load_state_dict(self.state_dict)
        return model.eval()

    def card(self) -> dict:
        """Everything but the weights: what a model card or a sidecar file shows."""
        record = asdict(self)
        record.pop("state_dict")
        record["positive_class"] = self.positive_class
        return record


def plain(value):
    """Numpy scalars and arrays, tuples and paths as JSON-like Python values: `weights_only=True`
    refuses to load anything else, so nothing else may go into a checkpoint."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, bool) or value is None:
        return value
    for kind in (int, float, str):  # exact types: a str subclass such as TorchVersion is refused on load
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def checkpoint_path(run: str | Path) -> Path:
    run = Path(run)
    return run / CHECKPOINT_NAME if run.is_dir() else run


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    path = Path(path)
    record = plain(asdict(checkpoint) | {"state_dict": {}})
    record["format"], record["format_version"] = FORMAT, FORMAT_VERSION
    record["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()}
    buffer = io.BytesIO()
    torch.save(record, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise XferlearnError(f"Disk full while writing {path}: the previous checkpoint (if any) is untouched; "
                                 "free some space and rerun with --resume.") from None
        raise XferlearnError(f"Cannot write {path}: {error.strerror or error}.") from None
    return path


def load_checkpoint(run: str | Path) -> Checkpoint:
    """Load a run folder's checkpoint (or a checkpoint file), refusing anything that is not ours."""
    path = checkpoint_path(run)
    if not path.exists():
        raise XferlearnError(f"No checkpoint at {path}: pass a run folder made by `xferlearn train`.")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code, zip damage, text files: all mean "not ours"
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise XferlearnError(f"{path} is not an xferlearn checkpoint (it cannot be loaded safely: {reason}).") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise XferlearnError(f"{path} is not an xferlearn checkpoint (no '{FORMAT}' marker); "
                             "train one with `xferlearn train`.")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise XferlearnError(f"{path} was written by a newer xferlearn (format {record['format_version']}); upgrade xferlearn.")
    record.pop("format"), record.pop("format_version")
    known = Checkpoint.__dataclass_fields__
    return Checkpoint(**{k: v for k, v in record.items() if k in known})

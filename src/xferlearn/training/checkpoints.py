"""Lightning checkpoints that can only ever resume the run that wrote them.

A run's identity is a hash of what decides its result: the resolved config (less `resume`,
`out`, `data`'s path, the cache folder and worker count, which do not change the model), the
content digest and label of every image, the class names and the train/validation split.
How long it trains (`epochs`, `finetune_epochs`, `patience`) and what is chosen after training
(`threshold`, `target_sensitivity`, `tta`) are left out too: `--resume --epochs 20` continues a
run for longer, and is still the same run. It is kept in RUN/identity.json, stamped into every
Lightning checkpoint (`IdentityStamp`) and every finished fine-tune stage, and compared before
anything is restored:

- a run started without --resume clears what an earlier attempt left (Lightning checkpoints,
  stages, logs), so nothing of it can be picked up later;
- a run started with --resume is refused when the folder belongs to another identity, and
  a checkpoint that cannot be loaded safely, or was stamped by another run, is refused with
  one line, never restored.

Lightning's own writes go through `_io.atomic_write` (`AtomicCheckpointIO`): a full disk
mid-training leaves no partial .ckpt behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from .._io import atomic_write, os_error, plain, read_json, write_json
from ..errors import XferlearnError
from ..rundir import RunDir

IDENTITY_KEY = "xferlearn_run_identity"
NOT_IDENTITY = ("resume", "out", "data", "cache_dir", "workers", "compile", "epochs", "finetune_epochs", "patience",
                "threshold", "target_sensitivity", "tta", "frozen_engine")


def run_identity(config_record: dict, manifest, train_idx, val_idx) -> str:
    record = {"config": {k: v for k, v in config_record.items() if k not in NOT_IDENTITY},
              "classes": manifest.classes, "images": [[s.digest, s.label] for s in manifest.samples],
              "train": [int(i) for i in train_idx], "val": [int(i) for i in val_idx]}
    return hashlib.sha256(json.dumps(plain(record), sort_keys=True).encode()).hexdigest()[:16]


def stored_identity(run: str | Path) -> str | None:
    record = read_json(RunDir(run).identity)
    return record.get("identity") if isinstance(record, dict) else None


def begin_attempt(run: RunDir, identity: str, resume: bool, say=print) -> None:
    """Clear an earlier attempt's leftovers (no --resume) or refuse another run's (--resume)."""
    if resume:
        stored = stored_identity(run.root)
        if stored is not None and stored != identity:
            instead = ("choose another --out (it holds that run's finished model, which a new run never overwrites)"
                       if run.checkpoint.exists() else
                       "rerun without --resume to start afresh there, or choose another --out")
            raise XferlearnError(f"--resume: {run.root} holds another run (identity {stored}; this command's "
                                 f"config, images and split give {identity}); {instead}.")
    else:
        leftovers = [path for path in run.resumable() if path.exists()]
        for path in leftovers:
            try:
                shutil.rmtree(path)
            except OSError as error:
                raise os_error(path, error, "clear") from None
        if leftovers:
            say(f"Cleared what an earlier attempt left in {run.root} ({', '.join(p.name for p in leftovers)}); "
                "pass --resume to continue an interrupted run instead.")
    write_json(run.identity, {"identity": identity})


def load_resumable(path: Path, identity: str | None, what: str = "checkpoint") -> dict:
    """A --resume checkpoint (Lightning's or a stage's), loaded safely and checked to be this run's."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, a pickle with code, not a checkpoint at all
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise XferlearnError(f"--resume: the {what} {path} cannot be loaded safely ({reason}); delete it, or rerun "
                             "without --resume to start afresh.") from None
    if not isinstance(record, dict):
        raise XferlearnError(f"--resume: {path} is not a {what} of this run; rerun without --resume.")
    stamped = record.get(IDENTITY_KEY)
    if identity is not None and stamped != identity:
        whose = ("carries no run identity (an older xferlearn, or another tool, wrote it)" if stamped is None
                 else f"belongs to another run (identity {stamped}, this run {identity})")
        raise XferlearnError(f"--resume: the {what} {path} {whose}; it was not used. Rerun without --resume to "
                             "start afresh.")
    return record


class IdentityStamp(Callback):
    """Stamps the run's identity into every checkpoint Lightning writes."""

    def __init__(self, identity: str | None):
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.identity is not None:
            checkpoint[IDENTITY_KEY] = self.identity


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writes through the package's one atomic write (temp, fsync, rename)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getvalue())

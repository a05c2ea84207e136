"""The training loop every recipe shares: a Lightning module and one `fit`.

`ClassifierModule` trains a network (a head on cached features, or a whole network) with
cross-entropy and logs validation loss, accuracy and AUC each epoch; `fit` runs Lightning
with best-by-validation-AUC checkpoint selection and resumption from `last.ckpt`. Lightning
runs the loop, so checkpoints, progress bars, bf16 and DDP come from it (the processes and
Trainer arguments: distributed.py; validation is gathered across them before AUC).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from torch.utils.data import DataLoader, DistributedSampler, WeightedRandomSampler
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from .._io import os_error
from ..config import TrainConfig
from ..evaluation.metrics import positive_index
from ..rundir import RunDir, read_history, write_history
from .distributed import rank, size, unpad_gathered
from .checkpoints import AtomicCheckpointIO, IdentityStamp, load_resumable, stored_identity

console = Console(stderr=True)


@contextmanager
def quiet_lightning():
    """Lightning's start-up chatter and notices that say nothing a user acts on, silenced for
    the fit alone (not for the user's process)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        # On --resume the run folder is meant to be reused (keep_earlier_history restores the log).
        warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
        # Frozen layers (and, by policy, BatchNorm) are in eval mode on purpose in a fine-tune.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        # A refit for an epoch count chosen on out-of-fold predictions validates on nothing, by design.
        warnings.filterwarnings("ignore", message=r".*validation_step.*no .*val_dataloader.*|.*Skipping val loop.*")
        # The head on cached features runs on the CPU by choice, also where a GPU is (seen on an H200).
        warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
        # Lightning's all_gather of the validation logits goes through this torch function.
        warnings.filterwarnings("ignore", message=r".*distributed.nn.functional.all_gather is deprecated.*")
        try:
            yield
        finally:
            logger.setLevel(level)


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of `net` (a head on features, or a whole network), with
    validation loss, accuracy and AUC logged each epoch for checkpoint selection."""

    def __init__(self, net: torch.nn.Module, classes: list[str], *, lr: float, weight_decay: float,
                 epochs: int, class_weights: torch.Tensor | None = None, positive: int | None = None,
                 keep_logits: bool = False):
        super().__init__()
        self.net, self.classes = net, classes
        self.lr, self.weight_decay, self.epochs = lr, weight_decay, epochs
        self.positive = (positive_index(classes) if positive is None else positive) if len(classes) == 2 else None
        # keep_logits: every epoch's validation logits, for choosing the epoch count on
        # out-of-fold predictions (training/crossfit.py).
        self.epoch_logits: list[np.ndarray] | None = [] if keep_logits else None
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(len(classes)))
        self._val_logits, self._val_targets = [], []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, weight=self.class_weights)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._val_logits.append(self(x).float())
        self._val_targets.append(y)

    def on_validation_epoch_end(self):
        logits, targets = torch.cat(self._val_logits), torch.cat(self._val_targets)
        self._val_logits, self._val_targets = [], []
        if self.trainer.world_size > 1:  # every rank scores the whole validation set, each image once
            n = len(self.trainer.val_dataloaders.dataset)
            logits, targets = unpad_gathered(self.all_gather(logits), n), unpad_gathered(self.all_gather(targets), n)
        if self.epoch_logits is not None:
            self.epoch_logits.append(logits.detach().cpu().numpy())
        probs = logits.softmax(dim=1)
        if self.positive is not None:
            auc = binary_auroc(probs[:, self.positive], (targets == self.positive).long())
        else:
            auc = multiclass_auroc(probs, targets, num_classes=len(self.classes))
        self.log_dict({"val_loss": F.cross_entropy(logits, targets), "val_auc": auc,
                       "val_acc": (probs.argmax(1) == targets).float().mean()}, prog_bar=True,
                      sync_dist=True)  # equal on every rank already: the mean changes nothing

    def configure_optimizers(self):
        # Adam as in the article, with decoupled weight decay and a cosine decay of the rate.
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return {"optimizer": optimizer, "lr_scheduler": self.schedule(optimizer)}

    def schedule(self, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The rate schedule over this fit's length, stepped once per epoch."""
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)

    def on_train_start(self):
        """A resumed fit follows the schedule of this fit's length from where it stands.

        Lightning restores the schedule saved in last.ckpt, with the length it was made for;
        after `--resume --epochs N` (a run continued for longer) the old cosine would climb back
        up past its end, and a one-cycle past its end raises. So the schedule is made afresh for
        this fit and stepped to the restored position (same length: the same rates)."""
        slot = self.trainer.lr_scheduler_configs[0]
        steps = slot.scheduler.last_epoch
        if steps <= 0:  # a fresh fit
            return
        for group in slot.scheduler.optimizer.param_groups:  # back to the rate a fresh fit starts at
            group["lr"] = group.get("initial_lr", group["lr"])
        schedule = self.schedule(slot.scheduler.optimizer)
        steps = min(steps, getattr(schedule, "total_steps", steps))  # a one-cycle cannot pass its end
        with warnings.catch_warnings():  # "step() before optimizer.step()": replaying, not training
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                schedule.step()
        slot.scheduler = schedule


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a balanced set gets all ones."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


class EpochSeededSampler(WeightedRandomSampler):
    """Weighted draws seeded by the run's seed and the epoch (Lightning calls `set_epoch`, as for a
    DistributedSampler), so a resumed run draws what the uninterrupted one would have drawn."""

    def __init__(self, weights, num_samples: int, replacement: bool, seed: int):
        super().__init__(weights, num_samples, replacement, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


def train_loader(dataset, y: np.ndarray, config: TrainConfig, num_classes: int, *, batch_size: int,
                 **loader_kwargs) -> DataLoader:
    """Shuffled batches of `dataset` (labels `y`), class-balanced with `--imbalance sampler`."""
    if config.imbalance == "sampler":
        # Each class drawn equally often; an epoch still has as many rows as the data.
        per_row = class_weights(y, num_classes).numpy()[y]
        sampler = EpochSeededSampler(per_row, num_samples=len(y), replacement=True, seed=config.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)
    # The same global batches at any number of processes: each takes every W-th row of one
    # permutation per epoch (seeded by the run's seed and the epoch; Lightning keeps a
    # DistributedSampler as it is and advances its epoch), so with batch_size / W rows each,
    # the processes' batches together are the one-process batch.
    sampler = DistributedSampler(dataset, num_replicas=size(), rank=rank(), shuffle=True, seed=config.seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)


def fit(module: ClassifierModule, train_data, val_data, config: TrainConfig, run: Path, *, stage: str = "",
        max_epochs: int | None = None, callbacks: list | None = None, keep: str = "best", **trainer_kwargs) -> dict:
    """Lightning fit with best-by-validation-AUC selection and resumption from last.ckpt.

    A recipe with several fits names each `stage`: its checkpoints go to RUN/lightning/STAGE
    and its log to RUN/logs/STAGE/metrics.csv (no stage: RUN/lightning, RUN/logs). Without
    `val_data`, or with `keep="last"`, nothing is selected: the fit runs its epochs and keeps
    the last weights (an epoch count chosen beforehand, on out-of-fold predictions; or an
    ensemble's member, linear.py), validating each epoch where `val_data` is given."""
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', not {keep!r}")
    select = val_data is not None and keep == "best"
    run = RunDir(run)
    # No "-v1" copies: a checkpoint name means one thing; an earlier attempt's are cleared or refused (checkpoints.py).
    # best.ckpt only where an epoch is chosen; last.ckpt after every epoch (resumption, and the weights
    # kept otherwise) from a checkpoint of its own: Lightning 2.6's `save_last` writes last.ckpt only
    # when a best.ckpt is written too, so a run killed after an epoch that was not the best, or in a
    # fit that selects nothing, resumed from an earlier epoch or from the start.
    latest = ModelCheckpoint(dirpath=run.lightning(stage), filename="last", save_top_k=1, monitor=None,
                             enable_version_counter=False)
    best = [ModelCheckpoint(dirpath=run.lightning(stage), filename="best", enable_version_counter=False,
                            save_top_k=1, monitor="val_auc", mode="max")] if select else []
    identity = stored_identity(run.root)
    last = run.lightning(stage) / "last.ckpt"
    history = run.history(stage)
    resume_from = str(last) if config.resume and last.exists() else None
    if resume_from:
        load_resumable(last, identity, "Lightning checkpoint")  # refused unless it is this run's and loads safely
    earlier = read_history(history) if resume_from else []
    try:
        with quiet_lightning():  # the Trainer's start-up notices too ("GPU available: ...", tips)
            trainer = L.Trainer(max_epochs=max_epochs or config.epochs,
                                logger=CSVLogger(run.logs(), name=stage, version=""),
                                callbacks=[latest, *best, IdentityStamp(identity), *(callbacks or [])],
                                plugins=[AtomicCheckpointIO()], enable_model_summary=False, log_every_n_steps=1,
                                # No sanity check: its two batches may hold one class, where AUC is undefined.
                                num_sanity_val_steps=0, deterministic=False, **trainer_kwargs)
            trainer.fit(module, train_data, val_data, ckpt_path=resume_from, weights_only=True)
    except OSError as error:  # Lightning's CSV log and folders: a full disk is one line too
        raise os_error(error.filename or run.root, error) from None
    trainer.strategy.barrier()  # rank 0 has written the checkpoints every rank reads next
    if earlier and trainer.is_global_zero:
        keep_earlier_history(history, earlier)
    if not select:
        last_auc = trainer.callback_metrics.get("val_auc") if val_data is not None else None
        if last_auc is None and val_data is not None:  # resumed after its last epoch: none ran in this call
            last_auc = next((row["val_auc"] for row in reversed(read_history(history)) if row.get("val_auc")), None)
        return {"kept": "the last epoch", "last_epoch_val_auc": None if last_auc is None else float(last_auc),
                "epochs_run": trainer.current_epoch}
    best_path, score = best[0].best_model_path, best[0].best_model_score
    if not best_path and (run.lightning(stage) / "best.ckpt").exists():
        # Resumed after its last epoch (killed before the caller saved the result): no epoch ran in
        # this call, so the callback chose nothing; the best epoch is on disk and in the log.
        best_path = str(run.lightning(stage) / "best.ckpt")
        scores = [float(row["val_auc"]) for row in read_history(history) if row.get("val_auc")]
        score = max(scores, default=None)
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return {"best_epoch_val_auc": None if score is None else float(score), "best_checkpoint": best_path,
            "epochs_run": trainer.current_epoch}


def keep_earlier_history(path: Path, earlier: list[dict]) -> None:
    """Lightning's CSV logger starts metrics.csv afresh on resume: put back the epochs the
    resumed run did not redo, so the curves cover the whole run."""
    later = read_history(path)
    first_new = min((int(row["epoch"]) for row in later if row.get("epoch")), default=None)
    rows = [r for r in earlier if first_new is None or int(r["epoch"]) < first_new] + later
    write_history(path, rows)

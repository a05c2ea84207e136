"""The `finetune` recipe: the head first, on cached features, then the network, unfrozen in stages.

fastai's `fine_tune` as the default rather than homework:
- Stage 0 ("head") is the `linear` recipe itself (`linear.fit_head`): the new classifier
  trains in seconds on features cached once per image and view, so the network's first
  gradients come from a sensible head, not a random one that would scramble the top blocks.
- Stages 1..K (`--stages 4,9`): each trains the head and the top N layer groups below it
  (timm's finest grouping, one group per EfficientNet/ResNet block, the stem at the bottom),
  the rest frozen. Layer-wise rates: the head gets `--lr-backbone`, each group further down
  `--layer-decay` times the one above it (early layers hold generic edges and textures;
  they need the least change). AdamW (no decay on norms and biases), a one-cycle schedule
  per stage (10% warm-up, then cosine), early stopping on validation AUC (`--patience`),
  optionally an EMA of the weights (`--ema 0.99`, Lightning's EMAWeightAveraging, used for
  validation and checkpoints; off by default: on the sharpness-conflict split's held-out
  images, three seeds, 0.995 changed AUC by -0.0000, -0.0076, -0.0101 and 0.99 by +0.0024,
  -0.0059, -0.0085; benchmarks/RESULTS.md, session 16).
  Each stage starts from the previous stage's best epoch.
- The result is the deepest stage, unless an earlier one (the head included) reads a higher
  validation AUC by more than noise (`choose_stage`).

BatchNorm policy (`--bn-policy`): `frozen` (the default) keeps every BatchNorm layer in
eval mode with the statistics it came with, throughout; its scale and shift still train
with their block. Batches of 32 give noisy batch statistics, and statistics that move
shift every activation the head stage was fitted to. `last_stage` lets the BatchNorm layers
of the trained blocks update their statistics (train mode) in the last stage only, once the
weights have settled; on a validation slice it lowered that stage's AUC, with and without
EMA (benchmarks/RESULTS.md), hence the default. Frozen layers are always in eval mode,
dropout and stochastic depth included, so they compute exactly what the cached features
came from.

Training images are decoded through the DecodeCache and given a fresh random view of the
`--augment` preset each time they are drawn; forward passes run in bf16 where the CPU does
it natively (Lightning's "bf16-mixed"), in channels-last layout. Validation, every epoch,
runs on the CPU through ONNX Runtime where `--feature-engine` resolves to it (as the cached
features do), the epoch's weights exported in memory.

Resumption: each finished stage leaves RUN/stages/NAME.pt (its best weights and score); a
run restarted with `--resume` loads finished stages instead of training them again, and
continues the unfinished one from RUN/lightning/NAME/last.ckpt (the end of its last epoch).
"""

from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging
from timm.models import group_parameters
from timm.optim import auto_group_layers, param_groups_layer_decay
from torch.nn.modules.batchnorm import _BatchNorm

from .._io import atomic_write
from ..config import TrainConfig
from ..data.augment import to_tensor, train_transform
from ..data.contrast import equalize_tensor
from ..data.folders import ImageDataset, Manifest
from ..data.images import DecodeCache
from ..evaluation.metrics import auc_standard_error
from ..models.features import default_workers, image_loader
from ..models.ensemble import Ensemble, Member
from ..models.inference import normalize, resolve_precision
from ..models.frozen_prefix import FrozenPrefix, frozen_prefix
from ..models.onnx_forward import OnnxForward, OnnxUnavailable, feature_engine, onnx_or_none
from .distributed import barrier, device, is_rank_zero, per_process_batch, size, trainer_options
from ..rundir import RunDir, read_history, write_history
from .checkpoints import IDENTITY_KEY, load_resumable, stored_identity
from .linear import fit_head, per_member
from .loop import ClassifierModule, class_weights, console, fit, train_loader

WARMUP_FRACTION = 0.1  # of each stage's steps: the rate climbs from 1/25 of its peak


def layer_ids(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> layer group, 0 at the input, the classifier at the top: timm's own
    grouping, the one its layer-decay optimisers use (an ensemble's member: its network's)."""
    if isinstance(model, Member):
        return {f"model.{name}": group for name, group in layer_ids(model.model).items()}
    if hasattr(model, "group_matcher"):
        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    else:
        ids = auto_group_layers(model)
    top = max(ids.values())
    return {name: ids.get(name, top) for name, _ in model.named_parameters()}


def unfreeze(model: torch.nn.Module, depth: int | None) -> list[str]:
    """Train the classifier and the `depth` layer groups below it (None: every layer); freeze
    the rest. Returns the names of the trainable parameters."""
    ids = layer_ids(model)
    lowest = 0 if depth is None else max(ids.values()) - depth
    for name, param in model.named_parameters():
        param.requires_grad_(ids[name] >= lowest)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def optimizer_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: rate `lr_backbone` x layer_decay^k
    for the group k layers below the classifier, no weight decay on 1-D tensors (norms, biases)."""
    network = model.model if isinstance(model, Member) else model  # the one timm knows how to group
    groups = param_groups_layer_decay(network, weight_decay=config.weight_decay, layer_decay=config.layer_decay)
    for group in groups:
        group["lr"] = config.lr_backbone * group.pop("lr_scale")
    return groups


class FinetuneModule(ClassifierModule):
    """The whole network on uint8 image batches, with the BatchNorm policy applied at the start
    of every training epoch (Lightning 2.x keeps module modes as it finds them, and the head
    stage leaves the network in eval mode)."""

    def __init__(self, net: torch.nn.Module, classes: list[str], preprocessing, config: TrainConfig, *,
                 update_bn: bool, class_weights: torch.Tensor | None = None):
        super().__init__(net, classes, lr=config.lr_backbone, weight_decay=config.weight_decay,
                         epochs=config.finetune_epochs, class_weights=class_weights)
        self.net = net.to(memory_format=torch.channels_last)
        self.mean, self.std, self.input_size = preprocessing.mean, preprocessing.std, preprocessing.input_size
        self.config, self.update_bn = config, update_bn
        self._validation_engine: OnnxForward | None | bool = None  # None: not tried this epoch; False: PyTorch
        self._frozen: FrozenPrefix | None = None  # the frozen layers on ONNX Runtime, while training
        self._said_frozen = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training and self._frozen is not None and images.dtype == torch.uint8:
            return self._frozen(images)
        x = normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        """On a CPU, each epoch's validation runs through ONNX Runtime (the epoch's weights exported
        in memory, 2 to 5 s for Lite0, checked against PyTorch): 4-5x PyTorch's speed on the 2
        AVX2 cores measured (benchmarks/tta_engines.py), and every epoch scores the whole split."""
        if self._validation_engine is None:
            self._validation_engine = self._onnx_engine() or False
        if not self._validation_engine:
            return super().validation_step(batch, batch_idx)
        images, targets = batch
        self._val_logits.append(self._validation_engine(images.cpu()))
        self._val_targets.append(targets)

    def on_validation_epoch_end(self):
        self._validation_engine = None  # the next epoch's weights need their own export
        super().on_validation_epoch_end()

    def _onnx_engine(self) -> OnnxForward | None:
        # Exported at the first batch, after every epoch-start hook (EMA swaps its weights in then).
        if feature_engine(self.config.feature_engine, self.device, self.config.precision) != "onnx":
            return None
        return onnx_or_none(copy.deepcopy(self.net).float(), self.mean, self.std, self.input_size,
                            torch.get_num_threads(), self.config.batch_size_features, console.print,
                            "Validation on PyTorch")

    def on_train_epoch_start(self):
        self.train()
        self._frozen = self._frozen_engine()  # exported each epoch: a resumed run may have loaded weights

    def on_train_end(self):
        self._frozen = None  # frees the ONNX Runtime session

    def _frozen_engine(self) -> FrozenPrefix | None:
        """With `--frozen-engine onnx`, on a CPU (where `--feature-engine` picks ONNX Runtime), the
        frozen lower layers run through ONNX Runtime: the conflict split's fine-tune took 0.58x the
        time. Not the default: over three seeds its models ranked held-out images worse on average
        (AUC -0.0029; pairs -0.0069, +0.0010, -0.0028) with a lower accuracy at their own
        thresholds, neither a proven loss nor parity (benchmarks/RESULTS.md, sessions 14-15)."""
        if self.config.frozen_engine != "onnx" or \
                feature_engine(self.config.feature_engine, self.device, self.config.precision) != "onnx":
            return None
        try:
            engine = frozen_prefix(self.net, self.mean, self.std, self.input_size, torch.get_num_threads(),
                                   per_process_batch(self.config.finetune_batch_size))
        except OnnxUnavailable as reason:
            engine = None
            message = f"Frozen layers on PyTorch instead of ONNX Runtime: {reason}"
        else:  # None: nothing leading is frozen, or the network (an ensemble's member) does not split
            message = (f"Fine-tune on a CPU: {engine.describe()}." if engine else
                       "Frozen layers on PyTorch: --frozen-engine onnx found no frozen prefix to split off here.")
        if message and not self._said_frozen:
            console.print(message)
            self._said_frozen = True
        return engine

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            trainable = [name for name, param in self.net.named_parameters() if param.requires_grad]
            for name, module in self.net.named_modules():
                active = not name or any(t.startswith(name + ".") for t in trainable)
                if not active or (isinstance(module, _BatchNorm) and not self.update_bn):
                    module.eval()
        return self

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(optimizer_groups(self.net, self.config))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.schedule(optimizer), "interval": "step"}}

    def schedule(self, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["max_lr" if "max_lr" in group else "lr"] for group in optimizer.param_groups],
            total_steps=self.trainer.estimated_stepping_batches, pct_start=WARMUP_FRACTION, anneal_strategy="cos",
            cycle_momentum=False)


class RandomViews(ImageDataset):
    """Decoded training images, each drawn with a fresh random view of the augmentation preset."""

    def __getitem__(self, index: int):
        array = self.cache.get(self.paths[index], self.digests[index])
        return equalize_tensor(self.transform(to_tensor(array)), self.cache.contrast), int(self.labels[index])


def stage_callbacks(config: TrainConfig) -> list:
    """The callbacks of every fine-tune stage (a seam the tests use to interrupt a run)."""
    callbacks = [EarlyStopping(monitor="val_auc", mode="max", patience=config.patience)]
    if config.ema:
        callbacks.append(EMAWeightAveraging(decay=config.ema))
    return callbacks


def save_stage(path: Path, model: torch.nn.Module, record: dict) -> dict:
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "record": record,
                IDENTITY_KEY: stored_identity(path.parent.parent)}, buffer)  # RUN/stages/NAME.pt -> RUN
    if is_rank_zero():
        atomic_write(path, buffer.getvalue())
    barrier()  # the other processes may read it next
    return record


def load_stage(path: Path, model: torch.nn.Module) -> dict:
    """A finished stage's record, its weights loaded into `model`."""
    stored = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(stored["state_dict"])
    return stored["record"]


def resume_stage(path: Path, model: torch.nn.Module, config: TrainConfig) -> dict | None:
    """With --resume, a stage that finished in an earlier run: its weights and record. None: train it."""
    if not (config.resume and path.exists()):
        return None
    stored = load_resumable(path, stored_identity(path.parent.parent), "finished stage")
    model.load_state_dict(stored["state_dict"])
    record = stored["record"]
    wanted, flag = (config.epochs, "--epochs") if record.get("depth") == 0 else (config.finetune_epochs,
                                                                                 "--finetune-epochs")
    longer = (f"; it ran {record['epochs']} epochs and is kept as it is: {flag} {wanted} applies to stages not "
              "finished yet" if record.get("epochs") is not None and record["epochs"] < wanted else "")
    console.print(f"Resuming: stage {record['stage']} was done (validation AUC {record['val_auc']:.4f}){longer}.")
    return record


def finetune(model: torch.nn.Module, manifest: Manifest, train_idx, val_idx, config: TrainConfig, arch: str,
             weights_tag: str, preprocessing, cache: DecodeCache, run: Path) -> dict:
    """The staged fine-tune; leaves the best stage's weights in `model` and returns how it chose.

    An ensemble (`--backbone a+b`) is fine-tuned member by member, each through the path it takes
    in the ensemble (the ensemble's input, resized and re-normalised for it) with its own head,
    stages and stage choice; the run's temperature and threshold then come from their mean. On the
    sharpness-conflict split's held-out images, Lite0+Lite1 so trained ranked better than Lite0 alone
    at two seeds of three (AUC +0.0087, -0.0011, +0.0040; accuracy at its own threshold 0.918
    against 0.903 on average) for about 2.3x the time (benchmarks/RESULTS.md, session 17): an
    option, not the default, which must fit 45 minutes on 2 AVX2 cores."""
    if isinstance(model, Ensemble):
        members = per_member(finetune_network, model, arch, "", manifest, train_idx, val_idx, config,
                             preprocessing=preprocessing, cache=cache, run=run)
        if is_rank_zero():
            combine_histories(run, [r["stage"] for member in members for r in member["stages"]])
        return {"members": members}
    return finetune_network(model, manifest, train_idx, val_idx, config, arch, weights_tag, preprocessing, cache, run)


def finetune_network(model: torch.nn.Module, manifest: Manifest, train_idx, val_idx, config: TrainConfig,
                     arch: str, weights_tag: str, preprocessing, cache: DecodeCache, run: Path,
                     stage: str = "") -> dict:
    """`finetune` of one network; `stage` (an ensemble's member0, member1...) prefixes its stages' names."""
    rundir = RunDir(run)
    named = (lambda name: f"{stage}-{name}") if stage else (lambda name: name)
    if stage:
        console.print(f"Fine-tune {stage}: {arch}.")
    records = [resume_stage(rundir.stage(named("head")), model, config)
               or fit_head_stage(model, manifest, train_idx, val_idx, config, arch, weights_tag, preprocessing,
                                 cache, run, named("head"))]
    labels = manifest.labels
    pick = manifest.take
    workers = default_workers(config.devices) if config.workers is None else config.workers
    # At most a process's share of the training images: batches are full ones only, and a batch
    # larger than the images would give no step at all.
    batch = min(per_process_batch(config.finetune_batch_size), max(2, len(train_idx) // size()))
    loader = train_loader(RandomViews(*pick(train_idx), cache, train_transform(config.augment)), labels[train_idx],
                          config, len(manifest.classes), batch_size=batch,
                          num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                          pin_memory=device(config).type == "cuda")
    val_loader = image_loader(ImageDataset(*pick(val_idx), cache), config.batch_size_features, workers)
    weights = class_weights(labels[train_idx], len(manifest.classes)) if config.imbalance == "weights" else None
    depths = config.stage_depths()
    for number, depth in enumerate(depths, start=1):
        records.append(resume_stage(rundir.stage(named(f"stage{number}")), model, config) or fit_stage(
            model, number, depth, loader, val_loader, config, run, preprocessing, manifest.classes, weights,
            update_bn=config.bn_policy == "last_stage" and number == len(depths), name=named(f"stage{number}")))

    chosen = choose_stage(records, np.bincount(labels[val_idx], minlength=len(manifest.classes)))
    if chosen < len(records) - 1:  # the model holds the last stage's best epoch
        load_stage(rundir.stage(records[chosen]["stage"]), model)
    for param in model.parameters():
        param.requires_grad_(True)
    model.eval()
    if is_rank_zero() and not stage:  # an ensemble's members' logs are combined once, all of them
        combine_histories(run, [r["stage"] for r in records])
    console.print("Stages (validation AUC): " + ", ".join(f"{r['stage']} {r['val_auc']:.4f}" for r in records)
                  + f"; chosen: {records[chosen]['stage']}.")
    return {"best_epoch_val_auc": records[chosen]["val_auc"], "chosen_stage": records[chosen]["stage"],
            "stages": records, "bn_policy": config.bn_policy, "ema": config.ema}


def choose_stage(records: list[dict], class_counts) -> int:
    """The deepest stage, unless an earlier one's validation AUC beats it by more than twice that
    AUC's standard error (the smallest class against the rest). On a random split that reads 0.997
    and more, smaller differences are noise, and on the sharpness-conflict split the deeper stage
    ranked held-out images better (+0.0037 AUC, paired CI -0.0005 to +0.0079; benchmarks/RESULTS.md,
    session 7), where choosing the best validation AUC had picked a shallower stage by 0.0004."""
    scores = [-1.0 if r["val_auc"] is None else r["val_auc"] for r in records]
    deepest = len(records) - 1
    smallest = int(min(class_counts))
    margin = 2 * auc_standard_error(max(scores[deepest], 0.5), smallest, int(sum(class_counts)) - smallest)
    best = max(range(len(records)), key=lambda k: (scores[k], k))
    return best if scores[best] > scores[deepest] + margin else deepest


def fit_head_stage(model, manifest, train_idx, val_idx, config, arch, weights_tag, preprocessing, cache,
                   run: Path, name: str = "head") -> dict:
    """Stage 0: the `linear` recipe's head on cached features (linear.py), saved as RUN/stages/head.pt."""
    started = time.perf_counter()
    selection, _, _ = fit_head(model, manifest, train_idx, val_idx, config, arch, weights_tag, preprocessing,
                               cache, run, stage=name)
    return save_stage(RunDir(run).stage(name), model, {
        "stage": name, "depth": 0, "val_auc": selection["best_epoch_val_auc"],
        "epochs": selection["epochs_run"], "seconds": round(time.perf_counter() - started, 1)})


def fit_stage(model, number: int, depth: int | None, loader, val_loader, config: TrainConfig, run: Path,
              preprocessing, classes: list[str], weights, *, update_bn: bool, name: str) -> dict:
    """Fine-tune stage `number` through Lightning, saved as RUN/stages/NAME.pt (stageN, or an
    ensemble member's memberK-stageN); the model keeps its best epoch."""
    started = time.perf_counter()
    # Each stage draws its own random views and dropout masks from the run's seed, whatever came
    # before it (cached features, a resumed run): the same command gives the same model.
    L.seed_everything(config.seed + number, verbose=False)
    trainable = unfreeze(model, depth)
    console.print(f"Fine-tune {name}: {len(trainable)} parameter tensors train "
                  f"({'all layers' if depth is None else f'{depth} layer groups below the head'}"
                  f"{', BatchNorm statistics updating' if update_bn else ''}).")
    module = FinetuneModule(model, classes, preprocessing, config, class_weights=weights, update_bn=update_bn)
    precision = "bf16-mixed" if resolve_precision(config.precision, device(config)) == "bf16" else "32-true"
    best = fit(module, loader, val_loader, config, run, stage=name, max_epochs=config.finetune_epochs,
               callbacks=stage_callbacks(config), precision=precision, **trainer_options(config))
    return save_stage(RunDir(run).stage(name), model, {
        "stage": name, "depth": depth, "val_auc": best["best_epoch_val_auc"], "epochs": best["epochs_run"],
        "seconds": round(time.perf_counter() - started, 1)})


def combine_histories(run: Path, stages: list[str]) -> None:
    """RUN/logs/metrics.csv: the stages' logs end to end, epochs numbered across stages, so the
    report's training curves show the whole recipe."""
    rows, offset = [], 0
    for stage in stages:
        history = read_history(RunDir(run).history(stage))
        epochs = [int(row["epoch"]) for row in history if row.get("epoch")]
        for row in history:
            if row.get("epoch"):
                rows.append({**row, "epoch": str(int(row["epoch"]) + offset)})
        offset += max(epochs, default=-1) + 1
    if rows:
        write_history(RunDir(run).history(), rows)


"""Training: the Lightning module, and the recipes that fit a classifier from a folder.

`train()` is the whole job, scan to checkpoint:
1. build the backbone (a clear error now beats one after an hour of decoding);
2. scan the folder, carve a patient-disjoint validation split, save it with the run;
3. fit with a recipe: `linear` is the article's (frozen base, a new softmax head, Adam,
   cross-entropy, its augmentation), on features computed once per image and view;
   `finetune` (finetune.py) starts there and then unfreezes the network in stages;
4. pick the epoch by validation AUC, calibrate a temperature and choose the decision
   threshold on validation alone (on test-time-augmented probabilities with `tta`), and
   write a self-describing checkpoint, with the class prior the probabilities refer to.
Lightning runs the loop, so checkpoints, progress bars, bf16 and DDP come from it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.progress import Progress
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from .backbones import create_model
from .checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from .config import TrainConfig
from .data import ImageDataset, Manifest, find_layout, save_split, scan, split_validation
from .errors import XferlearnError
from .features import FeatureExtractor, FeatureStore, extract, feature_key, image_loader, view_name
from .inference import default_device, resolve_precision
from .images import DecodeCache, atomic_write_bytes
from .metrics import apply_temperature, choose_threshold, compute_metrics, fit_temperature, positive_index

console = Console(stderr=True)
# Lightning's start-up chatter (accelerator lines, tips) says nothing a user acts on.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# On --resume the run folder is meant to be reused (keep_earlier_history restores the log).
warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of `net` (a head on features, or a whole network), with
    validation loss, accuracy and AUC logged each epoch for checkpoint selection."""

    def __init__(self, net: torch.nn.Module, classes: list[str], *, lr: float, weight_decay: float,
                 epochs: int, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.net, self.classes = net, classes
        self.lr, self.weight_decay, self.epochs = lr, weight_decay, epochs
        self.positive = positive_index(classes) if len(classes) == 2 else None
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(len(classes)))
        self._val_logits, self._val_targets = [], []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, weight=self.class_weights)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._val_logits.append(self(x).float())
        self._val_targets.append(y)

    def on_validation_epoch_end(self):
        logits, targets = torch.cat(self._val_logits), torch.cat(self._val_targets)
        self._val_logits, self._val_targets = [], []
        probs = logits.softmax(dim=1)
        if self.positive is not None:
            auc = binary_auroc(probs[:, self.positive], (targets == self.positive).long())
        else:
            auc = multiclass_auroc(probs, targets, num_classes=len(self.classes))
        self.log_dict({"val_loss": F.cross_entropy(logits, targets), "val_auc": auc,
                       "val_acc": (probs.argmax(1) == targets).float().mean()}, prog_bar=True)

    def configure_optimizers(self):
        # Adam as in the article, with decoupled weight decay and a cosine decay of the rate.
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict            # validation metrics at the chosen threshold
    seconds: float


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised so a balanced set gets all ones."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def train_loader(dataset, y: np.ndarray, config: TrainConfig, num_classes: int, *, batch_size: int,
                 **loader_kwargs) -> DataLoader:
    """Shuffled batches of `dataset` (labels `y`), class-balanced with `--imbalance sampler`."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.imbalance == "sampler":
        # Each class drawn equally often; an epoch still has as many rows as the data.
        per_row = class_weights(y, num_classes).numpy()[y]
        sampler = WeightedRandomSampler(per_row, num_samples=len(y), replacement=True, generator=generator)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, **loader_kwargs)


def effective_prior(y: np.ndarray, num_classes: int, config: TrainConfig) -> list[float]:
    """The class prior the trained model's probabilities refer to: the training split's own
    with `--imbalance none`; even with class weights or a balanced sampler, which train the
    model as if every class were equally common."""
    if config.imbalance == "none":
        return (np.bincount(y, minlength=num_classes) / len(y)).tolist()
    return [1.0 / num_classes] * num_classes


def fit_head(model, manifest: Manifest, train_idx, val_idx, config: TrainConfig, arch: str, weights_tag: str,
             preprocessing, cache: DecodeCache, run: Path, stage: str = ""):
    """The `linear` recipe: features once per image and view, then a Lightning fit of the head alone."""
    precision = resolve_precision(config.precision, default_device())
    store = FeatureStore(feature_key(arch, weights_tag, preprocessing, precision), config.cache_dir)
    paths, digests, labels = manifest.paths, manifest.digests, manifest.labels
    pick = lambda idx: ([paths[i] for i in idx], [digests[i] for i in idx])  # noqa: E731
    views = [(train_idx, v, config.augment) for v in range(config.views + 1)] + [(val_idx, 0, "none")]
    to_compute = sum(store.count_missing(view_name(v, preset, config.seed), [digests[i] for i in idx])
                     for idx, v, preset in views)
    extractor = FeatureExtractor(model, preprocessing, precision, compile=config.compile, n_images=to_compute,
                                 batch_size=config.batch_size_features)
    kwargs = dict(store=store, batch_size=config.batch_size_features, workers=config.workers, seed=config.seed)
    with Progress(console=console, transient=True) as progress:
        *train_views, val_x = [extract(extractor, *pick(idx), cache, view=v, preset=preset, progress=progress,
                                       **kwargs) for idx, v, preset in views]
    train_x = np.concatenate(train_views)
    train_y = np.tile(labels[train_idx], config.views + 1)
    val_y = labels[val_idx]

    # The head trains on standardised features (backbones differ in feature scale by orders of
    # magnitude, one learning rate cannot suit them all); the scaling is then folded into the
    # head's weights, so the saved model is a plain timm model with nothing added.
    head = model.get_classifier().train()  # the extractor put the whole model in eval mode
    # A floor on the scale: a feature nearly constant in training must not blow up on new images.
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.maximum(std, 0.1 * std.mean() + 1e-12)
    scale = isinstance(head, torch.nn.Linear)
    if scale:
        # Zero start: some timm inits (EfficientNet's, MobileNet's) draw the classifier from
        # U(+-1/sqrt(num_classes)), which on 1000+ standardised features gives logits of +-10
        # and a first epoch spent undoing it. A linear softmax head is convex: zero is a fine start.
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    standard = (lambda x: ((x - mean) / std).astype(np.float32)) if scale else (lambda x: x)  # noqa: E731
    module = ClassifierModule(head, manifest.classes, lr=config.lr, weight_decay=config.weight_decay,
                              epochs=config.epochs,
                              class_weights=class_weights(train_y, len(manifest.classes))
                              if config.imbalance == "weights" else None)
    val_loader = DataLoader(TensorDataset(torch.from_numpy(standard(val_x)), torch.from_numpy(val_y)), batch_size=1024)
    train_data = TensorDataset(torch.from_numpy(standard(train_x)), torch.from_numpy(train_y))
    best = fit(module, train_loader(train_data, train_y, config, len(manifest.classes), batch_size=config.batch_size),
               val_loader, config, run, stage=stage,
               accelerator="cpu")  # a linear layer on cached features: a GPU would only add transfers
    if scale:
        fold_standardisation(head, mean, std)
    with torch.inference_mode():
        val_logits = head.eval()(torch.from_numpy(val_x)).numpy()
    return best, val_logits, val_y


@torch.no_grad()
def fold_standardisation(head: torch.nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """W((x - mean) / std) + b == (W / std) x + (b - (W / std) mean): the same head on raw features."""
    weight = head.weight / torch.from_numpy(std).to(head.weight)
    head.bias -= weight @ torch.from_numpy(mean).to(head.weight)
    head.weight.copy_(weight)


def fit(module: ClassifierModule, train_data, val_data, config: TrainConfig, run: Path, *, stage: str = "",
        max_epochs: int | None = None, callbacks: list | None = None, **trainer_kwargs) -> dict:
    """Lightning fit with best-by-validation-AUC selection and resumption from last.ckpt.

    A recipe with several fits names each `stage`: its checkpoints go to RUN/lightning/STAGE
    and its log to RUN/logs/STAGE/metrics.csv (no stage: RUN/lightning, RUN/logs)."""
    checkpoints = ModelCheckpoint(dirpath=run / "lightning" / stage, filename="best", monitor="val_auc", mode="max",
                                  save_last=True)
    trainer = L.Trainer(max_epochs=max_epochs or config.epochs, logger=CSVLogger(run / "logs", name=stage, version=""),
                        callbacks=[checkpoints, *(callbacks or [])], enable_model_summary=False, log_every_n_steps=1,
                        # No sanity check: its two batches may hold one class, where AUC is undefined.
                        num_sanity_val_steps=0, deterministic=False, **trainer_kwargs)
    last = run / "lightning" / stage / "last.ckpt"
    history = run / "logs" / stage / "metrics.csv"
    resume_from = str(last) if config.resume and last.exists() else None
    earlier = read_history(history) if resume_from else []
    trainer.fit(module, train_data, val_data, ckpt_path=resume_from, weights_only=True)
    if earlier:
        keep_earlier_history(history, earlier)
    best_path = checkpoints.best_model_path
    if best_path:
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    score = checkpoints.best_model_score
    return {"best_epoch_val_auc": None if score is None else float(score), "best_checkpoint": best_path,
            "epochs_run": trainer.current_epoch}


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def keep_earlier_history(path: Path, earlier: list[dict]) -> None:
    """Lightning's CSV logger starts metrics.csv afresh on resume: put back the epochs the
    resumed run did not redo, so the curves cover the whole run."""
    later = read_history(path)
    first_new = min((int(row["epoch"]) for row in later if row.get("epoch")), default=None)
    rows = [r for r in earlier if first_new is None or int(r["epoch"]) < first_new] + later
    columns = sorted({key for row in rows for key in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def operating_point(val_logits: np.ndarray, val_y: np.ndarray, classes: list[str], config: TrainConfig,
                    view_logits: np.ndarray | None = None):
    """Temperature, threshold and validation metrics, all from the validation split alone.

    The temperature is fitted on the clean images' logits; with `view_logits` (V, N, C), the
    test-time-augmented logits, the threshold is chosen on the mean of their calibrated
    probabilities, the way prediction will compute them."""
    temperature = fit_temperature(val_logits, val_y)
    if view_logits is None:
        probs = apply_temperature(val_logits, temperature)
    else:
        probs = np.mean([apply_temperature(v, temperature) for v in view_logits], axis=0)
    if len(classes) == 2:
        pos = positive_index(classes)
        target = config.target_sensitivity
        threshold = choose_threshold((val_y == pos).astype(int), probs[:, pos], config.threshold, target)
        source = ("Youden's J (max sensitivity + specificity - 1)" if config.threshold == "youden"
                  else f"highest threshold with sensitivity >= {target}")
        source += f" on the validation split ({len(val_y)} images) at training time"
        if view_logits is not None:
            source += f", on probabilities averaged over {len(view_logits)} test-time-augmentation views"
    else:
        threshold, source = None, "argmax (multi-class)"
    metrics = compute_metrics(val_y, probs, classes, threshold, source)
    return temperature, threshold, source, metrics, probs


def validation_view_logits(checkpoint: Checkpoint, manifest: Manifest, val_idx, cache: DecodeCache,
                           config: TrainConfig) -> np.ndarray:
    """(V, N, C) logits of the validation images through the whole trained network, over the
    test-time-augmentation views where the checkpoint says `tta` (V=1 otherwise)."""
    from .predict import Predictor

    predictor = Predictor(checkpoint, precision=config.precision)
    dataset = ImageDataset([manifest.paths[i] for i in val_idx], [manifest.digests[i] for i in val_idx], None, cache)
    loader = image_loader(dataset, config.batch_size_features, config.workers)
    return np.concatenate([predictor.view_logits(images).cpu().numpy() for images, _ in loader], axis=1)


def calibrate(checkpoint: Checkpoint, manifest: Manifest, val_idx, cache: DecodeCache, config: TrainConfig,
              val_logits: np.ndarray | None = None) -> np.ndarray:
    """Set the checkpoint's temperature, threshold (and its source) and validation metrics from
    the validation split; return the validation probabilities they were chosen on. The clean
    logits are computed through the trained network unless given (the linear recipe's head
    scored the cached features already); with `tta`, so are the TTA views'."""
    val_y = manifest.labels[val_idx]
    view_logits = None
    if val_logits is None or config.tta:
        view_logits = validation_view_logits(checkpoint, manifest, val_idx, cache, config)
        val_logits = view_logits[0]
    temperature, threshold, source, metrics, val_probs = operating_point(
        val_logits, val_y, manifest.classes, config, view_logits if config.tta else None)
    if config.tta:  # what TTA bought, each side at its own validation threshold
        *_, plain, _ = operating_point(val_logits, val_y, manifest.classes, config)
        metrics["without_tta"] = {key: plain[key] for key in ("auc", "accuracy", "sensitivity", "specificity",
                                                              "threshold")}
    checkpoint.temperature, checkpoint.threshold, checkpoint.threshold_source = temperature, threshold, source
    checkpoint.metrics = metrics
    return val_probs


def write_validation_predictions(path: Path, manifest: Manifest, val_idx, probs: np.ndarray) -> None:
    """Per validation image: file, true class and calibrated probabilities, for error analysis
    and the benchmarks' bootstrap intervals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "label", *[f"p_{name}" for name in manifest.classes]])
    for i, row in zip(val_idx, probs):
        writer.writerow([manifest.paths[i], manifest.classes[manifest.labels[i]], *[f"{p:.6f}" for p in row]])
    atomic_write_bytes(path, buffer.getvalue().encode())


def prepare_run(config: TrainConfig) -> Path:
    run = Path(config.out)
    if (run / CHECKPOINT_NAME).exists() and not config.resume:
        raise XferlearnError(f"{run} already holds a trained model; choose another --out, or pass --resume "
                             "to continue that run.")
    run.mkdir(parents=True, exist_ok=True)
    return run


def train(config: TrainConfig | None = None, **options) -> TrainResult:
    """Train a classifier on a folder of class folders; see TrainConfig for the options."""
    config = config or TrainConfig(**options)
    started = time.perf_counter()
    L.seed_everything(config.seed, verbose=False)
    layout = find_layout(config.data)
    model, preprocessing, weights_tag = create_model(config.backbone, config.weights, len(layout.classes),
                                                     config.image_size)
    from .backbones import resolve
    arch = resolve(config.backbone)
    run = prepare_run(config)
    config.save(run / "config.json")

    cache = DecodeCache(config.cache_dir, preprocessing.input_size, preprocessing.interpolation)
    manifest = scan(layout.train_roots, cache)
    console.print(f"Scanned {len(manifest.samples)} images in {len(manifest.classes)} classes {manifest.counts()}; "
                  f"{len(manifest.duplicates)} exact duplicates kept once, {len(manifest.unreadable)} unreadable.")
    for path, reason in manifest.unreadable:
        console.print(f"  unreadable: {path}: {reason}", highlight=False)
    train_idx, val_idx, how = split_validation(manifest, config.val_fraction, config.seed)
    save_split(run / "split.json", manifest, train_idx, val_idx, how)
    console.print(f"Validation split: {len(val_idx)} images ({how}).")

    if config.recipe == "finetune":
        from .finetune import finetune

        selection = finetune(model, manifest, train_idx, val_idx, config, arch, weights_tag, preprocessing, cache, run)
        val_logits = None
    else:
        selection, val_logits, _ = fit_head(model, manifest, train_idx, val_idx, config, arch, weights_tag,
                                            preprocessing, cache, run)
    checkpoint = Checkpoint(arch=arch, backbone=config.backbone, weights=weights_tag,
                            preprocessing=preprocessing.to_dict(), classes=manifest.classes,
                            positive_index=positive_index(manifest.classes) if len(manifest.classes) == 2 else None,
                            threshold=None, threshold_source="", state_dict=model.state_dict(),
                            config=config.to_dict(), tta=config.tta,
                            class_prior=effective_prior(manifest.labels[train_idx], len(manifest.classes), config))
    val_probs = calibrate(checkpoint, manifest, val_idx, cache, config, val_logits)
    metrics = checkpoint.metrics
    metrics["selection"] = selection
    write_validation_predictions(run / "validation_predictions.csv", manifest, val_idx, val_probs)
    path = save_checkpoint(checkpoint, run / CHECKPOINT_NAME)
    threshold, source = checkpoint.threshold, checkpoint.threshold_source
    seconds = time.perf_counter() - started
    atomic_write_bytes(run / "validation_metrics.json", json.dumps(metrics, indent=2).encode())
    console.print(f"Validation: AUC {metrics['auc']:.4f}, accuracy {metrics['accuracy']:.4f}, "
                  f"sensitivity {metrics['sensitivity']:.4f}, specificity {metrics['specificity']:.4f} "
                  f"at threshold {threshold if threshold is None else round(threshold, 4)} ({source}). "
                  f"{seconds:.0f} s. Checkpoint: {path}")
    return TrainResult(run, path, metrics, seconds)

"""The `linear` recipe, the article's: a frozen base and a new softmax head.

Features are computed once per image and view (models/features.py), kept on disk
(models/feature_store.py) and read from there a batch at a time, so the head's epochs never
hold the table in memory; in a distributed run each process computes its share. The head is
trained on standardised features and the scaling folded back into its weights, so the saved
model is a plain timm model. Cross-fitting (crossfit.py) trains heads on in-memory folds
through the same `train_head`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..data.augment import in_view, view_shares
from ..data.folders import Manifest
from ..data.images import DecodeCache
from ..models.feature_store import FeatureRows, FeatureStore
from ..models.features import FeatureExtractor, extract, feature_key, pooling, view_name
from ..models.base import usable_cores
from ..models.ensemble import Ensemble, member_names
from ..models.inference import resolve_precision
from ..models.onnx_forward import feature_engine
from .distributed import (barrier, device, is_rank_zero, loader_workers, per_process_batch, rank, size,
                          trainer_options)
from .loop import ClassifierModule, class_weights, console, fit, train_loader


def effective_prior(y: np.ndarray, num_classes: int, config: TrainConfig) -> list[float]:
    """The class prior the trained model's probabilities refer to: the training split's own
    with `--imbalance none`; even with class weights or a balanced sampler, which train the
    model as if every class were equally common."""
    if config.imbalance == "none":
        return (np.bincount(y, minlength=num_classes) / len(y)).tolist()
    return [1.0 / num_classes] * num_classes


class ArrayRows:
    """An in-memory feature table with FeatureRows' reading interface (cross-fitting's folds,
    which only small data uses)."""

    def __init__(self, x: np.ndarray):
        self.x = np.ascontiguousarray(x, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def read(self, positions) -> np.ndarray:
        return self.x[np.asarray(positions)]

    def chunks(self, size: int = 4096):
        for start in range(0, len(self.x), size):
            yield self.x[start:start + size]

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x.mean(0), self.x.std(0)


class FeatureRowsDataset(Dataset):
    """(standardised feature row, label) pairs read a batch at a time (`__getitems__`)."""

    def __init__(self, rows, labels: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None):
        self.rows, self.labels, self.mean, self.std = rows, labels, mean, std

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices):
        x = self.rows.read(indices)
        if self.mean is not None:
            x = ((x - self.mean) / self.std).astype(np.float32)
        return list(zip(torch.from_numpy(x), torch.from_numpy(self.labels[np.asarray(indices)])))

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]


def compute_features(model, manifest: Manifest, train_idx, val_idx, config: TrainConfig, arch: str,
                     weights_tag: str, preprocessing, cache: DecodeCache, scored_training: bool = False
                     ) -> tuple[list[tuple[np.ndarray, FeatureRows]], FeatureRows | None]:
    """Frozen features, from the store where computed before: per training view (view 0 clean,
    the rest augmented) the images it covers (all of `train_idx`, or a share of them where
    `--views` is fractional) and their table; and the clean validation images' table (None
    without any, as under cross-fitting). In a distributed run each process computes its share.

    Images whose scores choose the threshold and the epoch (the validation images; every
    training view too where `scored_training`, as cross-fitting scores them out of fold) go
    through the engine `predict` uses on this machine, so validation sees what prediction
    computes. Views that only train the head may take a faster engine for the network
    (`feature_engine`: PyTorch's bf16 for dense convolutions where the CPU computes it natively)."""
    here = device(config)
    scoring_engine = feature_engine(config.feature_engine, here, config.precision)
    training_engine = scoring_engine if scored_training else \
        feature_engine(config.feature_engine, here, config.precision, model, preprocessing.input_size)
    train_idx, digests = np.asarray(train_idx, dtype=np.int64), manifest.take(train_idx)[1]
    views = [(train_idx, 0, config.augment)]
    for v, share in enumerate(view_shares(config.views), 1):
        covered = train_idx[np.array([in_view(d, v, config.seed, share) for d in digests], dtype=bool)]
        views += [(covered, v, config.augment)] if len(covered) else []
    n_train = len(views)
    views += [(val_idx, 0, "none")] if len(val_idx) else []
    engines = [training_engine] * n_train + [scoring_engine] * (len(views) - n_train)
    tables = [None] * len(views)
    for engine in dict.fromkeys(engines):  # one or two engines, in a fixed order for every process
        mine = [i for i, e in enumerate(engines) if e == engine]
        for i, table in zip(mine, _features_on(engine, model, manifest, [views[i] for i in mine], config, arch,
                                               weights_tag, preprocessing, cache)):
            tables[i] = table
    return [(idx, table) for (idx, _, _), table in zip(views[:n_train], tables)], tables[-1] if len(val_idx) else None


def _features_on(engine: str, model, manifest: Manifest, views, config: TrainConfig, arch: str, weights_tag: str,
                 preprocessing, cache: DecodeCache) -> list[FeatureRows]:
    """The tables of `views` ((images, view, preset) each) computed on `engine`, or read from its store."""
    here = device(config)
    precision = "fp32" if engine == "onnx" else resolve_precision(config.precision, here)
    pick = lambda idx: manifest.take(idx)[:2]  # noqa: E731
    names = [view_name(v, preset, config.seed) for _, v, preset in views]

    def listed(engine: str):
        store = FeatureStore(feature_key(arch, weights_tag, preprocessing, precision, engine, pooling(model)),
                             config.cache_dir)
        missing = [store.missing(name, pick(idx)[1]) for name, (idx, _, _) in zip(names, views)]
        barrier()  # every process has listed what is missing before any of them adds to the store
        return store, missing

    store, missing = listed(engine)
    extractor = None
    if any(missing):  # the same answer in every process: `missing` is the whole list, not a share
        extractor = FeatureExtractor(model, preprocessing, precision, device=here, compile=config.compile,
                                     n_images=sum(map(len, missing)) // size(),
                                     batch_size=config.batch_size_features, engine=engine,
                                     threads=max(1, usable_cores() // config.devices))
        if extractor.engine != engine:  # ONNX Runtime was refused: PyTorch's features go under its own key
            store, missing = listed(extractor.engine)
    kwargs = dict(batch_size=config.batch_size_features, workers=loader_workers(config), seed=config.seed,
                  shard=(rank(), size()))
    with Progress(console=console, transient=True, disable=not is_rank_zero()) as progress:
        for (idx, v, preset), todo in zip(views, missing):
            extract(extractor, *pick(idx), cache, store, todo, view=v, preset=preset, progress=progress, **kwargs)
    barrier()  # every process's part is written: the store is whole
    return [store.rows(name, pick(idx)[1]) for name, (idx, _, _) in zip(names, views)]


def train_head(head, train_rows, train_y: np.ndarray, val_rows, val_y: np.ndarray | None, config: TrainConfig,
               classes: list[str], run: Path, *, stage: str = "", positive: int | None = None,
               max_epochs: int | None = None, keep_logits: bool = False, progress_bar: bool = True,
               keep: str = "best"):
    """Fit `head` on feature rows (FeatureRows, ArrayRows or an array) through the shared loop;
    best epoch by validation AUC where validation is given (`keep="last"`: the last epoch,
    validated but not chosen), else `max_epochs` of them. The
    cosine schedule always spans `config.epochs`, so a refit for a chosen epoch count follows
    the very trajectory it was chosen on. Returns the loop's selection record and the module."""
    as_rows = lambda x: ArrayRows(x) if isinstance(x, np.ndarray) else x  # noqa: E731
    train_rows = as_rows(train_rows)
    val_rows = None if val_rows is None else as_rows(val_rows)
    # The head trains on standardised features (backbones differ in feature scale by orders of
    # magnitude, one learning rate cannot suit them all); the scaling is then folded into the
    # head's weights, so the saved model is a plain timm model with nothing added.
    head.train()  # the extractor put the whole model in eval mode
    # A floor on the scale: a feature nearly constant in training must not blow up on new images.
    mean, std = train_rows.mean_std()
    std = np.maximum(std, 0.1 * std.mean() + 1e-12)
    scale = isinstance(head, torch.nn.Linear)
    if scale:
        # Zero start: some timm inits (EfficientNet's, MobileNet's) draw the classifier from
        # U(+-1/sqrt(num_classes)), which on 1000+ standardised features gives logits of +-10
        # and a first epoch spent undoing it. A linear softmax head is convex: zero is a fine start.
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    norm = (mean, std) if scale else (None, None)
    module = ClassifierModule(head, classes, lr=config.lr, weight_decay=config.weight_decay, epochs=config.epochs,
                              class_weights=class_weights(train_y, len(classes))
                              if config.imbalance == "weights" else None, positive=positive, keep_logits=keep_logits)
    val_loader = None if val_rows is None else DataLoader(FeatureRowsDataset(val_rows, val_y, *norm),
                                                          batch_size=1024)
    train_data = FeatureRowsDataset(train_rows, train_y, *norm)
    best = fit(module, train_loader(train_data, train_y, config, len(classes),
                                    batch_size=per_process_batch(config.batch_size)),
               val_loader, config, run, stage=stage, max_epochs=max_epochs, keep=keep, enable_progress_bar=progress_bar,
               # one process: a linear layer on cached features on the CPU (a GPU would only add transfers)
               **trainer_options(config, "cpu"))
    if scale:
        fold_standardisation(head, mean, std)
    return best, module


def fit_head(model, manifest: Manifest, train_idx, val_idx, config: TrainConfig, arch: str, weights_tag: str,
             preprocessing, cache: DecodeCache, run: Path, stage: str = "", positive: int | None = None,
             keep: str = "best"):
    """The `linear` recipe: features once per image and view, then a Lightning fit of the head alone.
    An ensemble fits each member's head so (`per_member`); its validation logits are their mean.

    A member keeps its last epoch, not its best by validation AUC: it is never used alone, and
    choosing each member's epoch on a split that reads 0.9997 is choosing on noise. Over 5 seeds
    the default ensemble so ranked held-out images better on both shifted splits (conflict
    +0.0009 AUC, NORMAL2 batch held out +0.0010, every seed; benchmarks/RESULTS.md, session 12),
    though a single Lite0 head lost 0.0018 on the batch split that way, so a single network
    still keeps its best epoch."""
    if isinstance(model, Ensemble):
        fits = per_member(fit_head, model, arch, stage, manifest, train_idx, val_idx, config,
                          preprocessing=preprocessing, cache=cache, run=run, positive=positive, keep="last")
        return {"members": [best for best, _, _ in fits]}, np.mean([logits for _, logits, _ in fits], 0), fits[0][2]
    train_views, val_rows = compute_features(model, manifest, train_idx, val_idx, config, arch, weights_tag,
                                             preprocessing, cache)
    train_y = np.concatenate([manifest.labels[idx] for idx, _ in train_views])
    val_y = manifest.labels[val_idx]
    head = model.get_classifier()
    best, _ = train_head(head, FeatureRows.concat([table for _, table in train_views]), train_y, val_rows, val_y,
                         config, manifest.classes, run, stage=stage, positive=positive, keep=keep)
    head = head.cpu().eval()
    with torch.inference_mode():
        val_logits = np.concatenate([head(torch.from_numpy(x)).numpy() for x in val_rows.chunks()])
    return best, val_logits, val_y


def per_member(fit, model: Ensemble, arch: str, stage: str, *args, **kwargs) -> list:
    """`fit` once per member of an ensemble, each in its own stage folder (an interrupted run
    resumes member by member) and under its own feature-store key: the member's architecture
    and size, its weights, and (from the caller's preprocessing) the ensemble's input it
    resizes, all that changes its features, so ensembles sharing a member and an input size
    share its features."""
    if len(model.weights_tags) != len(model.members):  # only create_model names the members' weights
        raise ValueError("an ensemble to train must come from create_model, which records each member's weights")
    return [fit(member, *args, arch=f"{name}@{member.size}", weights_tag=tag, stage=f"{stage}member{i}", **kwargs)
            for i, (name, member, tag) in enumerate(zip(member_names(arch), model.members, model.weights_tags))]


@torch.no_grad()
def fold_standardisation(head: torch.nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """W((x - mean) / std) + b == (W / std) x + (b - (W / std) mean): the same head on raw features."""
    weight = head.weight / torch.from_numpy(std).to(head.weight)
    head.bias -= weight @ torch.from_numpy(mean).to(head.weight)
    head.weight.copy_(weight)

"""The `linear` recipe, the article's: a frozen base and a new softmax head.

Features are computed once per image and view (models/features.py) and the head trains on
them through the shared loop in seconds. The head is trained on standardised features and
the scaling folded back into its weights, so the saved model is a plain timm model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, TensorDataset

from ..config import TrainConfig
from ..data.folders import Manifest
from ..data.images import DecodeCache
from ..models.features import FeatureExtractor, FeatureStore, extract, feature_key, view_name
from ..models.inference import default_device, resolve_precision
from .loop import ClassifierModule, class_weights, console, fit, train_loader


def effective_prior(y: np.ndarray, num_classes: int, config: TrainConfig) -> list[float]:
    """The class prior the trained model's probabilities refer to: the training split's own
    with `--imbalance none`; even with class weights or a balanced sampler, which train the
    model as if every class were equally common."""
    if config.imbalance == "none":
        return (np.bincount(y, minlength=num_classes) / len(y)).tolist()
    return [1.0 / num_classes] * num_classes


def compute_features(model, manifest: Manifest, train_idx, val_idx, config: TrainConfig, arch: str,
                     weights_tag: str, preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features: (views + 1, len(train_idx), F) for the training images (view 0 clean,
    the rest augmented) and (len(val_idx), F) for the clean validation images; from the
    feature store where computed before."""
    precision = resolve_precision(config.precision, default_device())
    store = FeatureStore(feature_key(arch, weights_tag, preprocessing, precision), config.cache_dir)
    paths, digests = manifest.paths, manifest.digests
    pick = lambda idx: ([paths[i] for i in idx], [digests[i] for i in idx])  # noqa: E731
    views = [(train_idx, v, config.augment) for v in range(config.views + 1)]
    views += [(val_idx, 0, "none")] if len(val_idx) else []  # none under cross-fitting
    to_compute = sum(store.count_missing(view_name(v, preset, config.seed), [digests[i] for i in idx])
                     for idx, v, preset in views)
    extractor = FeatureExtractor(model, preprocessing, precision, compile=config.compile, n_images=to_compute,
                                 batch_size=config.batch_size_features)
    kwargs = dict(store=store, batch_size=config.batch_size_features, workers=config.workers, seed=config.seed)
    cache = DecodeCache(config.cache_dir, preprocessing.input_size, preprocessing.interpolation)
    with Progress(console=console, transient=True) as progress:
        computed = [extract(extractor, *pick(idx), cache, view=v, preset=preset, progress=progress, **kwargs)
                    for idx, v, preset in views]
    train_views = np.stack(computed[:config.views + 1])
    return train_views, computed[-1] if len(val_idx) else train_views[0, :0]


def train_head(head, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None, val_y: np.ndarray | None,
               config: TrainConfig, classes: list[str], run: Path, *, stage: str = "", positive: int | None = None,
               max_epochs: int | None = None, keep_logits: bool = False, progress_bar: bool = True):
    """Fit `head` on (rows, F) features through the shared loop; best epoch by validation AUC
    where validation is given, else `max_epochs` of them. The cosine schedule always spans
    `config.epochs`, so a refit for a chosen epoch count follows the very trajectory it was
    chosen on. Returns the loop's selection record and the module."""
    # The head trains on standardised features (backbones differ in feature scale by orders of
    # magnitude, one learning rate cannot suit them all); the scaling is then folded into the
    # head's weights, so the saved model is a plain timm model with nothing added.
    head.train()  # the extractor put the whole model in eval mode
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
    module = ClassifierModule(head, classes, lr=config.lr, weight_decay=config.weight_decay, epochs=config.epochs,
                              class_weights=class_weights(train_y, len(classes))
                              if config.imbalance == "weights" else None, positive=positive, keep_logits=keep_logits)
    val_loader = None if val_x is None else DataLoader(
        TensorDataset(torch.from_numpy(standard(val_x)), torch.from_numpy(val_y)), batch_size=1024)
    train_data = TensorDataset(torch.from_numpy(standard(train_x)), torch.from_numpy(train_y))
    best = fit(module, train_loader(train_data, train_y, config, len(classes), batch_size=config.batch_size),
               val_loader, config, run, stage=stage, max_epochs=max_epochs,
               accelerator="cpu",  # a linear layer on cached features: a GPU would only add transfers
               enable_progress_bar=progress_bar)
    if scale:
        fold_standardisation(head, mean, std)
    return best, module


def fit_head(model, manifest: Manifest, train_idx, val_idx, config: TrainConfig, arch: str, weights_tag: str,
             preprocessing, cache: DecodeCache, run: Path, stage: str = "", positive: int | None = None):
    """The `linear` recipe: features once per image and view, then a Lightning fit of the head alone."""
    train_views, val_x = compute_features(model, manifest, train_idx, val_idx, config, arch, weights_tag,
                                          preprocessing)
    train_x = train_views.reshape(-1, train_views.shape[-1])
    train_y = np.tile(manifest.labels[train_idx], config.views + 1)
    val_y = manifest.labels[val_idx]
    head = model.get_classifier()
    best, _ = train_head(head, train_x, train_y, val_x, val_y, config, manifest.classes, run, stage=stage,
                         positive=positive)
    with torch.inference_mode():
        val_logits = head.eval()(torch.from_numpy(val_x)).numpy()
    return best, val_logits, val_y


@torch.no_grad()
def fold_standardisation(head: torch.nn.Linear, mean: np.ndarray, std: np.ndarray) -> None:
    """W((x - mean) / std) + b == (W / std) x + (b - (W / std) mean): the same head on raw features."""
    weight = head.weight / torch.from_numpy(std).to(head.weight)
    head.bias -= weight @ torch.from_numpy(mean).to(head.weight)
    head.weight.copy_(weight)

"""Frozen-backbone features, computed once per image and view, and kept on disk.

With the base frozen, every epoch of the article's recipe recomputes the very same
features; here each (image, view) goes through the backbone once. The store is keyed by
everything that changes a feature (architecture, weights, preprocessing, precision, engine
and pooling; augmented views are tables named by their preset and seed) and, inside that, by
each image's content hash, so a second run on the same or an overlapping folder reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.augment import train_transform
from ..data.folders import ImageDataset
from ..data.images import DecodeCache
from .ensemble import Member
from .feature_store import FeatureStore
from .inference import FastForward
from .onnx_forward import onnx_or_none

log = logging.getLogger(__name__)

FEATURE_FORMAT = 2  # bump when the way features are computed or stored changes (2: parts of rows, feature_store.py)


def default_workers(processes: int = 1) -> int:
    """Loader processes that decode and augment while the model computes: one on 2 cores (it
    takes the gaps the model's two threads leave; the default recipe ran 109 s against 117 s
    with none on the 2-core benchmark machine, one run each, so a rough figure), half the
    cores (at most 8) where they are plenty. `processes` on one machine share its cores."""
    cores = (os.cpu_count() or 1) // max(1, processes)
    return 0 if cores < 2 else max(1, min(8, cores // 2))


def image_loader(dataset, batch_size: int, workers: int | None = None, **options) -> DataLoader:
    """Batches of decoded images: `default_workers()` loader processes unless told, and pinned
    memory where a GPU takes the batches (its copies from pinned memory run asynchronously)."""
    if workers is None:  # a loader process overlaps batches: with one batch it only costs its start
        workers = default_workers() if len(dataset) > batch_size else 0
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      **options)


class PooledFeatures(torch.nn.Module):
    """A timm model cut before its classifier: (N, 3, H, W) -> (N, F) pooled pre-logits features."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        # Some heads (VGG's) pool after their pre-logits layers: pool what is still spatial.
        return features if features.ndim == 2 else features.flatten(2).mean(-1)


class FeatureExtractor:
    """Pooled pre-logits features of a frozen timm model, through the fastest engine here:
    ONNX Runtime where `engine` is "onnx" (onnx_forward.py), else PyTorch's fast inference path.
    `engine` says which ran: an ONNX export that fails or disagrees falls back to PyTorch."""

    def __init__(self, model: torch.nn.Module, preprocessing, precision: str = "auto", device: str | None = None,
                 compile: str | bool = "off", n_images: int | None = None, batch_size: int = 32,
                 engine: str = "torch", threads: int = 1):
        self.engine = engine
        if engine == "onnx":
            self.forward = onnx_or_none(PooledFeatures(model), preprocessing.mean, preprocessing.std,
                                        preprocessing.input_size, threads, batch_size, log.warning,
                                        "features on PyTorch")
            if self.forward is not None:
                return
            self.engine = "torch"
        self.forward = FastForward(PooledFeatures(model), precision, device, compile, n_images, batch_size,
                                   normalize=(preprocessing.mean, preprocessing.std))

    @property
    def on_cpu(self) -> bool:
        return self.engine == "onnx" or self.forward.device.type == "cpu"

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, F) float32 features."""
        return self.forward(batch).numpy()


def pooling(model: torch.nn.Module) -> str | None:
    """The global pooling a network (or an ensemble's member) was built with by backbones.with_pool;
    None where it kept its own."""
    return getattr(model.model if isinstance(model, Member) else model, "built_pool", None)


def feature_key(arch: str, weights_tag: str, preprocessing, precision: str, engine: str = "torch",
                pool: str | None = None) -> str:
    """The store's key: what changes a feature. The engine too, as its fp32 sums round differently,
    and the pooling where it is not the network's own (keys without them are those from before)."""
    described = {"arch": arch, "weights": weights_tag, "preprocessing": preprocessing.to_dict(),
                 "precision": precision, "format": FEATURE_FORMAT} | ({"engine": engine} if engine != "torch" else {})
    described |= {"pool": pool} if pool is not None else {}
    description = json.dumps(described, sort_keys=True)
    return hashlib.sha1(description.encode()).hexdigest()[:16]


def view_name(view: int, preset: str, seed: int) -> str:
    return "clean" if view == 0 else f"{preset}-seed{seed}-view{view}"


def extract(extractor: FeatureExtractor, paths, digests, cache: DecodeCache, store: FeatureStore,
            missing: list[int] | None = None, *, view: int = 0, preset: str = "none", seed: int = 0,
            batch_size: int = 32, workers: int | None = None, progress=None, shard: tuple[int, int] = (0, 1)) -> None:
    """Compute into `store` the features of one view of the images it lacks (`missing`, as
    `store.missing` listed them), streamed to disk batch by batch. With `shard` (rank,
    processes), only every processes-th of them from rank: each process of a distributed run
    writes its own part. The processes must list `missing` before any of them writes, and
    wait for all of them before reading `store.rows`."""
    name = view_name(view, preset, seed)
    rank, processes = shard
    missing = store.missing(name, digests) if missing is None else missing
    mine = missing[rank::processes]
    if not mine:
        return
    transform = train_transform(preset) if view else None
    dataset = ImageDataset([paths[i] for i in mine], [digests[i] for i in mine], None, cache, transform, view, seed)
    if workers is None and not view and extractor.on_cpu:
        # Clean images come from the decode cache (under a millisecond each): a loader process
        # only takes cycles from the engine's threads on the same cores. The default recipe with
        # the decode cache warm ran 74.7 and 78.7 s without one against 77.8 and 83.6 s with one
        # (2 AVX2 cores, two pairs in swapped order). Augmented views keep it: they cost more.
        workers = 0
    loader = image_loader(dataset, batch_size, workers)
    task = progress.add_task(f"features ({name})", total=len(mine)) if progress else None

    def batches():
        for images, _ in loader:
            rows = extractor(images)
            if progress:
                progress.advance(task, len(rows))
            yield rows

    store.write(name, [digests[i] for i in mine], batches())

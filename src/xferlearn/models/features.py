"""Frozen-backbone features, computed once per image and view, and kept on disk.

With the base frozen, every epoch of the article's recipe recomputes the very same
features; here each (image, view) goes through the backbone once. The store is keyed by
everything that changes a feature (architecture, weights, preprocessing, precision and,
for augmented views, the augmentation preset and seed) and, inside that, by each
image's content hash, so a second run on the same or an overlapping folder reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._io import atomic_write
from ..data.augment import train_transform
from ..data.folders import ImageDataset
from ..data.images import DecodeCache, default_cache_dir
from ..errors import XferlearnError
from .inference import FastForward

FEATURE_FORMAT = 1  # bump when the way features are computed changes


def default_workers() -> int:
    """Loader processes that decode and augment while the model computes: one on 2 cores (it
    takes the gaps the model's two threads leave; the default recipe ran 109 s against 117 s
    with none on the 2-core benchmark machine, one run each, so a rough figure), half the
    cores (at most 8) where they are plenty."""
    cores = os.cpu_count() or 1
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
    """Pooled pre-logits features of a frozen timm model, through the fast inference path."""

    def __init__(self, model: torch.nn.Module, preprocessing, precision: str = "auto", device: str | None = None,
                 compile: str | bool = "off", n_images: int | None = None, batch_size: int = 32):
        self.forward = FastForward(PooledFeatures(model), precision, device, compile, n_images, batch_size,
                                   normalize=(preprocessing.mean, preprocessing.std))

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, F) float32 features."""
        return self.forward(batch).numpy()


def feature_key(arch: str, weights_tag: str, preprocessing, precision: str) -> str:
    description = json.dumps({"arch": arch, "weights": weights_tag, "preprocessing": preprocessing.to_dict(),
                              "precision": precision, "format": FEATURE_FORMAT}, sort_keys=True)
    return hashlib.sha1(description.encode()).hexdigest()[:16]


def view_name(view: int, preset: str, seed: int) -> str:
    return "clean" if view == 0 else f"{preset}-seed{seed}-view{view}"


class FeatureStore:
    """One .npz per (feature key, view): the digests it covers and their feature rows."""

    def __init__(self, key: str, root: Path | None = None):
        self.dir = Path(root or default_cache_dir()) / "features" / key

    def _path(self, view: str) -> Path:
        return self.dir / f"{view}.npz"

    def load(self, view: str) -> dict[str, np.ndarray]:
        path = self._path(view)
        if not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as stored:
                return dict(zip(stored["digests"].tolist(), stored["features"]))
        except (OSError, ValueError, KeyError):
            return {}  # a damaged store is recomputed, not trusted

    def count_missing(self, view: str, digests) -> int:
        known = self.load(view)
        return sum(d not in known for d in digests)

    def save(self, view: str, rows: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        digests = sorted(rows)
        np.savez(buffer, digests=np.array(digests), features=np.stack([rows[d] for d in digests]))
        try:
            atomic_write(self._path(view), buffer.getvalue())
        except XferlearnError:
            pass  # a full or read-only cache only costs recomputation next time


def extract(extractor: FeatureExtractor, paths, digests, cache: DecodeCache, *, view: int = 0,
            preset: str = "none", seed: int = 0, store: FeatureStore | None = None,
            batch_size: int = 32, workers: int | None = None, progress=None) -> np.ndarray:
    """Features of one view of every image, from the store where present, computed otherwise."""
    name = view_name(view, preset, seed)
    known = store.load(name) if store else {}
    missing = [i for i, d in enumerate(digests) if d not in known]
    if missing:
        transform = train_transform(preset) if view else None
        dataset = ImageDataset([paths[i] for i in missing], [digests[i] for i in missing], None,
                               cache, transform, view, seed)
        loader = image_loader(dataset, batch_size, workers)
        task = progress.add_task(f"features ({name})", total=len(missing)) if progress else None
        done = 0
        for images, _ in loader:
            rows = extractor(images)
            for j, row in enumerate(rows):
                known[digests[missing[done + j]]] = row
            done += len(rows)
            if progress:
                progress.advance(task, len(rows))
        if store:
            store.save(name, known)
    return np.stack([known[d] for d in digests]).astype(np.float32)

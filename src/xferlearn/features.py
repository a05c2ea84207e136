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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .augment import normalize, train_transform
from .data import ImageDataset
from .images import DecodeCache, atomic_write_bytes, default_cache_dir

FEATURE_FORMAT = 1  # bump when the way features are computed changes


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware computes it natively, else 'fp32'."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def default_workers() -> int:
    """No loader workers on 2 cores (the model needs both); a few where cores are plenty."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


class FeatureExtractor:
    """Pooled pre-logits features of a timm model, in inference mode."""

    def __init__(self, model: torch.nn.Module, preprocessing, precision: str = "auto", device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.preprocessing = preprocessing

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, F) float32 features."""
        x = normalize(batch, self.preprocessing.mean, self.preprocessing.std)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with self.autocast():
            features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return features.float().cpu().numpy()


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

    def save(self, view: str, rows: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        digests = sorted(rows)
        np.savez(buffer, digests=np.array(digests), features=np.stack([rows[d] for d in digests]))
        try:
            atomic_write_bytes(self._path(view), buffer.getvalue())
        except OSError:
            pass  # a full or read-only cache only costs recomputation next time


def extract(extractor: FeatureExtractor, paths, digests, cache: DecodeCache, *, view: int = 0,
            preset: str = "none", seed: int = 0, store: FeatureStore | None = None,
            batch_size: int = 64, workers: int | None = None, progress=None) -> np.ndarray:
    """Features of one view of every image, from the store where present, computed otherwise."""
    name = view_name(view, preset, seed)
    known = store.load(name) if store else {}
    missing = [i for i, d in enumerate(digests) if d not in known]
    if missing:
        transform = train_transform(preset) if view else None
        dataset = ImageDataset([paths[i] for i in missing], [digests[i] for i in missing], None,
                               cache, transform, view, seed)
        workers = default_workers() if workers is None else workers
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
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

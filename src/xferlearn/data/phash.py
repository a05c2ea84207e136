"""Perceptual hashes: finding the same picture after re-encoding or resizing.

A content hash (the file's bytes) misses a training image saved again as PNG, recompressed
or resized. The difference hash (dHash) of the decoded image survives those: the gray image
is averaged down to 9x8 pixels and each bit says whether a pixel is brighter than its right
neighbour. Two images whose 64-bit hashes differ in at most `MAX_DISTANCE` bits are taken
for copies of one picture (a threshold in the range the dHash literature uses for
near-duplicates; unrelated photographs differ in about 32).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .images import DecodeCache, progress_bar

MAX_DISTANCE = 6


def dhash(array: np.ndarray) -> str:
    """The 64-bit difference hash of an (H, W[, C]) uint8 image, as 16 hex digits."""
    gray = array.mean(axis=2) if array.ndim == 3 else array.astype(np.float64)
    small = np.asarray(Image.fromarray(gray.astype(np.float32), mode="F").resize((9, 8), Image.Resampling.BOX))
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def hashes(paths, digests, cache: DecodeCache, workers: int | None = None) -> list[str]:
    """dHash of each image, decoded through the cache (as the model sees it)."""
    def one(job):
        return dhash(cache.get(*job))

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        return list(progress_bar(pool.map(one, zip(paths, digests)), len(paths), "perceptual hashes"))


def near_matches(queries: list[str], known: list[str], max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """For each query hash, whether some known hash lies within `max_distance` bits of it."""
    if not queries or not known:
        return np.zeros(len(queries), dtype=bool)
    q = np.array([int(h, 16) for h in queries], dtype=np.uint64)
    k = np.array([int(h, 16) for h in known], dtype=np.uint64)
    found = np.zeros(len(q), dtype=bool)
    for start in range(0, len(q), 256):  # chunks bound the (chunk x known) matrix of bit counts
        xor = q[start:start + 256, None] ^ k[None, :]
        distance = np.unpackbits(xor.view(np.uint8).reshape(*xor.shape, 8), axis=-1).sum(-1)
        found[start:start + 256] = (distance <= max_distance).any(axis=1)
    return found

"""Perceptual hashes: finding the same picture after re-encoding or resizing.

A content hash (the file's bytes) misses a training image saved again as PNG, recompressed
or resized. The difference hash (dHash) of the decoded image survives those: the gray image
is averaged down to 17x16 pixels and each bit says whether a pixel is brighter than its right
neighbour. Two images whose 256-bit hashes differ in at most `MAX_DISTANCE` bits are taken
for copies of one picture. 256 bits, not the usual 64: chest X-rays all look alike at 9x8,
and 64-bit hashes of different patients' X-rays differed by a median of 2 bits (every image
was a "copy"). At 256 bits, on the shared chest X-ray train split, the nearest other
patient's image was never closer than 14 bits (1st percentile 17, median 37; 100 images
against 1500), while a copy saved at half size as JPEG quality 60 moved at most 7 bits.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .._io import read_json, write_json
from ..errors import XferlearnError
from .images import DecodeCache, progress_bar

MAX_DISTANCE = 10
SIDE = 16  # the hash is SIDE x SIDE bits


def dhash(array: np.ndarray) -> str:
    """The 256-bit difference hash of an (H, W[, C]) uint8 image, as 64 hex digits."""
    gray = array.mean(axis=2) if array.ndim == 3 else array.astype(np.float64)
    small = np.asarray(Image.fromarray(gray.astype(np.float32), mode="F").resize((SIDE + 1, SIDE),
                                                                                  Image.Resampling.BOX))
    return np.packbits((small[:, 1:] > small[:, :-1]).flatten()).tobytes().hex()


def _memo_path(cache: DecodeCache) -> Path:
    return cache.root / f"dhash{SIDE * SIDE}.json"


def _read_memo(cache: DecodeCache) -> dict[str, str]:
    memo = read_json(_memo_path(cache))
    width = SIDE * SIDE // 4  # hex digits of one hash; anything else in the memo is not trusted
    return {k: v for k, v in memo.items() if isinstance(v, str) and len(v) == width} if isinstance(memo, dict) else {}


def remember(cache: DecodeCache, known: dict[str, str]) -> None:
    """Add {content hash: dHash} to the memo beside the decode cache (scan hashes what it decodes).
    Merged with what another run added meanwhile; a race loses entries only to be hashed again,
    and a full or read-only cache only means hashing again next time."""
    if not known or not cache.writable:
        return
    try:
        write_json(_memo_path(cache), _read_memo(cache) | known)
    except XferlearnError:
        pass


def hashes(paths, digests, cache: DecodeCache, workers: int | None = None) -> list[str]:
    """dHash of each image, decoded through the cache (as the model sees it). Remembered beside
    the decode cache (one small JSON per image size; `scan` adds the images it decodes), so a
    later run over the same images reads 64 hex digits an image instead of decoding and hashing
    it again (6 s of a 5,216-image run on 2 cores). A damaged memo is only recomputed."""
    memo = _read_memo(cache)
    # Keyed by content hash; an image given without one is hashed every time, under its path.
    keys = [digest if digest is not None else f"path:{path}" for path, digest in zip(paths, digests)]
    todo = {key: job for key, job in zip(keys, zip(paths, digests)) if key not in memo}

    def one(item):
        key, job = item
        return key, dhash(cache.get(*job))

    if todo:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            found = dict(progress_bar(pool.map(one, todo.items()), len(todo), "perceptual hashes"))
        memo.update(found)
        remember(cache, {k: v for k, v in found.items() if not k.startswith("path:")})
    return [memo[key] for key in keys]


def near_matches(queries: list[str], known: list[str], max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """For each query hash, whether some known hash lies within `max_distance` bits of it."""
    if not queries or not known:
        return np.zeros(len(queries), dtype=bool)
    as_bytes = lambda hashes: np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hashes])  # noqa: E731
    q, k = as_bytes(queries), as_bytes(known)
    if q.shape[1] != k.shape[1]:  # a run from before the 256-bit hash: no comparison is meaningful
        return np.zeros(len(queries), dtype=bool)
    found = np.zeros(len(q), dtype=bool)
    for start in range(0, len(q), 64):  # chunks bound the (chunk x known x bytes) array of differing bits
        distance = np.unpackbits(q[start:start + 64, None] ^ k[None, :], axis=-1).sum(-1)
        found[start:start + 64] = (distance <= max_distance).any(axis=1)
    return found

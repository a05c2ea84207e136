"""What the HTTP service keeps to itself and how much it takes on at once.

- `without_paths`: the model card a client sees (`GET /model`) names no file or folder of
  the server (the training data, the run, the cache, the best epoch's checkpoint, a weights file).
- `decode_slots`: how many uploads decode at once, sized by the memory available.
- `tame_allocator`: glibc's malloc arenas capped at two for `xferlearn serve`.
"""

from __future__ import annotations

import os
import re
import sys

from ..data.images import MAX_DECODE_BYTES
from ..models.base import usable_cores


# Config fields that name places on the server (the training data, the run, the cache).
_PATH_FIELDS = {"data", "out", "cache_dir", "best_checkpoint", "calibration"}


_FOLDERS = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:)?[/\\][^\s#:]*[/\\]")  # a path's folders, up to its last separator


def without_paths(value):
    """The card as a client may see it: no filesystem paths of the server. Path-valued fields
    are dropped; any other value that is a path (a --weights file) keeps its file name only."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items() if k not in _PATH_FIELDS}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str):
        return _FOLDERS.sub("", value)  # "file:/home/me/w.pt#ab12" -> "file:w.pt#ab12"
    return value



def decode_slots(budget_bytes: int = 0) -> int:
    """How many uploads may decode at once: one per core (at least 2, so that one decode overlaps
    the model's pass on a single core; more only queues in memory, decoding is CPU-bound), fewer
    where the memory available could not hold that many worst-case decodes (data/images.py's
    MAX_DECODE_BYTES each, about three times over while converting), and at least one."""
    per_decode = 3 * (budget_bytes or MAX_DECODE_BYTES)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 0
    by_memory = available // 2 // per_decode if available else 2
    cores = usable_cores()
    return max(1, min(max(2, cores), int(by_memory)))


def tame_allocator() -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core) and rarely
    returns their memory: under a long run of requests a server's resident memory grew from 1.0
    to 4.0 GB that way (allocator growth, not a leak). Two arenas hold it near 1.75 GB. For
    `xferlearn serve` alone, which owns its process; MALLOC_ARENA_MAX in the environment wins."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX = -8 (malloc.h)
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tame
        pass

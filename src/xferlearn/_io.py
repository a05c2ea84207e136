"""The one way this package writes files, hashes them and turns values into JSON.

Every artifact (checkpoint, config, split, reports, exports, cache entries) is written by
`atomic_write`: a temporary file beside the target, flushed and fsynced, then renamed over
it, so a reader never sees half a file and a crash or a full disk leaves the previous
version whole. An OS error there becomes one `XferlearnError` line that names the path
(ENOSPC, EACCES, EROFS and the rest); cache writers that must never fail catch it.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import XferlearnError

_ADVICE = {errno.ENOSPC: "Disk full", errno.EDQUOT: "Disk quota used up",
           errno.EACCES: "Permission denied", errno.EPERM: "Permission denied", errno.EROFS: "Read-only file system"}
_WHAT_TO_DO = {errno.ENOSPC: "free some space and run the command again (train: with --resume)",
               errno.EDQUOT: "free some space and run the command again (train: with --resume)",
               errno.EROFS: "choose a folder on a writable disk"}


def os_error(path: Path | str, error: OSError, what: str = "write") -> XferlearnError:
    """An OSError as the one line a user reads: what failed, where, and what to do."""
    reason = _ADVICE.get(error.errno, error.strerror or str(error))
    advice = _WHAT_TO_DO.get(error.errno, "choose a folder you can write to")
    return XferlearnError(f"{reason}: cannot {what} {path}; nothing partial was left there and any earlier "
                          f"version is untouched; {advice}.")


def atomic_write(path: str | Path, data: bytes | str | Iterable[bytes], durable: bool = True) -> Path:
    """Write-then-rename. `data` may be an iterable of byte chunks, written as they come (a file
    bigger than memory, e.g. a feature table). `durable=False` skips the fsync: for cache
    entries, which are checked on reading and rebuilt when damaged, one fsync per decoded image
    costs more than decoding."""
    data = data.encode() if isinstance(data, str) else data
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    with atomic_stream(path, binary=True, durable=durable) as handle:
        for chunk in chunks:
            handle.write(chunk)
    return Path(path)


@contextmanager
def atomic_stream(path: str | Path, newline: str | None = None, *, binary: bool = False, durable: bool = True):
    """A file written as it streams (`predict -o`; every `atomic_write`): into a temporary file
    beside the target, fsynced and renamed over it only when the block ends without error; an
    error leaves no partial file and any earlier version whole. Files get the usual
    0644-under-umask permissions (mkstemp's 0600 would hide run folders from colleagues)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": newline})) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise os_error(path, error) from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def plain(value):
    """Numpy scalars and arrays, tuples and paths as plain JSON-like Python values; NaN and
    infinities (an undefined metric) become None, since JSON has neither. A checkpoint holds
    only such values, so it loads with `weights_only=True`."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return plain(value.tolist())
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    for kind in (int, str):  # exact types: a str subclass such as TorchVersion is refused on load
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def write_json(path: str | Path, record) -> Path:
    return atomic_write(path, json.dumps(plain(record), indent=2) + "\n")


def read_json(path: str | Path) -> dict | list | None:
    """A JSON file's value, or None where it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(data: bytes) -> str:
    """The key of an image's bytes in the decode and feature caches."""
    return hashlib.sha1(data).hexdigest()


def read_csv_rows(path: str | Path) -> list[dict]:
    """A CSV file's rows as dicts; [] where the file is missing."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise XferlearnError(f"cannot read {path}: {error}") from None


def write_csv_rows(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Rows as a CSV file, atomically; the columns are every key seen (sorted) unless given."""
    columns = columns or sorted({key for row in rows for key in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue())

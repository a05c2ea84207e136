"""The frozen-feature cache on disk, read row by row: no table is ever in memory whole.

Per (feature key, view) a folder of parts: `part-TAG.npy` (float32 rows, a plain .npy) and
`part-TAG.digests` (the content hash of each row's image, one a line, in row order). A part
holds the rows one process computed in one go; the store is the union of its parts, so
several processes (the ranks of a distributed run) each write their share without a merge,
and a later run on an overlapping folder adds only the images it lacks. Reading is by
offset (`os.pread`), not by memory map: mapped pages that were read count as the process's
resident memory, read pages do not, so training on 100,000 images holds what 5,000 do.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .._io import atomic_write
from ..data.images import default_cache_dir
from ..errors import XferlearnError

ROW_DTYPE = np.dtype("<f4")


def _npy_layout(path: Path) -> tuple[int, int, int]:
    """(rows, columns, byte offset of the data) of a 2-D float32 .npy file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
    if len(shape) != 2 or fortran or dtype != ROW_DTYPE:
        raise ValueError(f"{path} is not a C-ordered 2-D float32 table")
    if os.path.getsize(path) != offset + shape[0] * shape[1] * ROW_DTYPE.itemsize:
        raise ValueError(f"{path} is truncated")
    return shape[0], shape[1], offset


class FeatureRows:
    """Rows of a store in a chosen order, read from disk on demand. Picklable (DataLoader
    workers reopen the files)."""

    def __init__(self, parts: list[tuple[str, int]], dim: int, part_of: np.ndarray, row_of: np.ndarray):
        self.parts, self.dim = parts, dim  # parts: (path, data offset)
        self.part_of, self.row_of = part_of.astype(np.int32), row_of.astype(np.int64)
        self._files: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.row_of)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    @classmethod
    def concat(cls, tables: list["FeatureRows"]) -> "FeatureRows":
        parts, part_of = [], []
        for table in tables:
            part_of.append(table.part_of + len(parts))
            parts.extend(table.parts)
        return cls(parts, tables[0].dim, np.concatenate(part_of), np.concatenate([t.row_of for t in tables]))

    def read(self, positions) -> np.ndarray:
        """(len(positions), dim) float32; contiguous rows of a part come in one read."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), dtype=ROW_DTYPE)
        if not len(positions):
            return out
        part, row = self.part_of[positions], self.row_of[positions]
        starts = np.flatnonzero(np.r_[True, (part[1:] != part[:-1]) | (row[1:] != row[:-1] + 1)])
        ends = np.r_[starts[1:], len(positions)]
        width = self.dim * ROW_DTYPE.itemsize
        for start, end in zip(starts.tolist(), ends.tolist()):
            path, offset = self.parts[part[start]]
            fd = self._files.get(part[start])
            if fd is None:
                fd = self._files[int(part[start])] = os.open(path, os.O_RDONLY)
            data = os.pread(fd, (end - start) * width, offset + int(row[start]) * width)
            out[start:end] = np.frombuffer(data, dtype=ROW_DTYPE).reshape(end - start, self.dim)
        return out

    def chunks(self, size: int = 4096) -> Iterator[np.ndarray]:
        for start in range(0, len(self), size):
            yield self.read(np.arange(start, min(start + size, len(self))))

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Column means and (population) standard deviations, one chunk in memory at a time
        (Chan et al.'s pairwise update, in float64)."""
        count, mean, m2 = 0, np.zeros(self.dim), np.zeros(self.dim)
        for chunk in self.chunks():
            chunk = chunk.astype(np.float64)
            n, chunk_mean = len(chunk), chunk.mean(0)
            delta = chunk_mean - mean
            m2 += ((chunk - chunk_mean) ** 2).sum(0) + delta ** 2 * count * n / (count + n)
            mean += delta * n / (count + n)
            count += n
        return mean.astype(np.float32), np.sqrt(m2 / max(count, 1)).astype(np.float32)


class FeatureStore:
    """The features of one feature key: per view, parts of rows keyed by image content hash."""

    def __init__(self, key: str, root: Path | None = None):
        self.dir = Path(root or default_cache_dir()) / "features" / key

    def _index(self, view: str) -> tuple[list[tuple[str, int]], int, dict[str, tuple[int, int]]]:
        parts, dim, where = [], 0, {}
        for listing in sorted((self.dir / view).glob("part-*.digests")):
            table = listing.with_suffix(".npy")
            try:
                digests = listing.read_text().split()
                rows, columns, offset = _npy_layout(table)
            except (OSError, ValueError):
                continue  # a damaged or half-written part is recomputed, not trusted
            if rows != len(digests) or (dim and columns != dim):
                continue
            dim = columns
            for row, digest in enumerate(digests):
                where.setdefault(digest, (len(parts), row))
            parts.append((str(table), offset))
        return parts, dim, where

    def missing(self, view: str, digests) -> list[int]:
        """Positions in `digests` of the images the store has no row for."""
        where = self._index(view)[2]
        return [i for i, d in enumerate(digests) if d not in where]

    def rows(self, view: str, digests) -> FeatureRows:
        parts, dim, where = self._index(view)
        try:
            located = np.array([where[d] for d in digests], dtype=np.int64).reshape(-1, 2)
        except KeyError:
            raise XferlearnError(f"the feature cache {self.dir / view} lost rows while this run used it; "
                                 "run again (it recomputes them).") from None
        return FeatureRows(parts, dim, located[:, 0], located[:, 1])

    def write(self, view: str, digests: list[str], batches: Iterable[np.ndarray]) -> None:
        """A part: the rows of `digests`, in order, streamed to disk as `batches` yields them."""
        tag = hashlib.sha1("\n".join(digests).encode()).hexdigest()[:16]
        path = self.dir / view / f"part-{tag}.npy"

        def stream():
            batches_left = iter(batches)
            first = np.ascontiguousarray(next(batches_left), dtype=ROW_DTYPE)
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": ROW_DTYPE.str, "fortran_order": False,
                                                          "shape": (len(digests), first.shape[1])})
            yield header.getvalue()
            yield first.tobytes()
            for batch in batches_left:
                yield np.ascontiguousarray(batch, dtype=ROW_DTYPE).tobytes()

        # The rows first, their listing second: a part without its listing is never read.
        atomic_write(path, stream(), durable=False)
        atomic_write(path.with_suffix(".digests"), "\n".join(digests) + "\n", durable=False)

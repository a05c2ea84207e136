"""Decoding any image file into the fixed-size RGB array every later stage works on.

Whatever a folder holds (grayscale, RGB, RGBA, palette, 16-bit, any size, EXIF-rotated),
`decode` turns it into a `size x size x 3` uint8 array, squashed rather than cropped so
that no part of an X-ray is lost (as Keras' `flow_from_directory` does). `DecodeCache`
keeps those arrays on disk, keyed by the file's content hash and the size, so that an
image is decoded once and never again, whatever run or epoch asks for it.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, ImageOps

from .._io import atomic_write, content_hash  # noqa: F401  (content_hash: re-exported for the data stage)
from ..config import CONTRASTS
from ..errors import XferlearnError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
# Far above any X-ray (the largest in the Kaggle set is ~2900x2700) yet a bound against
# decompression bombs. Checked here on the header, before decoding, rather than by setting
# PIL's process-wide Image.MAX_IMAGE_PIXELS, which would change it for the user's code too.
MAX_PIXELS = 100_000_000
# The second bound, in bytes: what the decoded pixels take (width x height x channels x bytes per
# sample, read from the header), so that depth and channels count too: a 111 KB 16-bit
# 7000x7000 PNG is under the pixel bound and 98 MB decoded. 256 MiB takes a 50-megapixel RGB
# image or a 100-megapixel 8-bit gray one; decoding works within about three times this.
MAX_DECODE_BYTES = 256 * 2**20
_ROWS_AT_ONCE = 256  # 16-bit and float images are rescaled this many rows at a time (no full float copy)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


INTERPOLATIONS = ("bilinear", "bicubic")  # what weight sets use; decode also takes nearest and lanczos
RESOLVED_CONTRASTS = tuple(c for c in CONTRASTS if c != "auto")  # what a run records once auto is decided


def is_gray(array: np.ndarray) -> bool:
    """Whether an (H, W, 3) uint8 array has three equal channels."""
    return bool((array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all())


@dataclass(frozen=True)
class Preprocessing:
    """How an image must be prepared for a set of weights: squash to a square, equalise its contrast
    where the run chose to, scale, normalise."""

    input_size: int
    mean: tuple[float, float, float]  # on the 0..1 scale
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic"
    contrast: str = "none"  # "clahe" | "none": the contrast step after decoding (data/contrast.py)

    def __post_init__(self):
        # Checked here because preprocessing is also read back from checkpoints and caches.
        if not isinstance(self.input_size, int) or self.input_size < 16:
            raise XferlearnError(f"input size must be an integer of at least 16 pixels, got {self.input_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise XferlearnError(f"preprocessing needs 3 means and 3 positive stds, got {self.mean} and {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise XferlearnError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                                 f"got {self.interpolation!r}")
        if self.contrast not in RESOLVED_CONTRASTS:
            raise XferlearnError(f"the contrast step must be one of {', '.join(RESOLVED_CONTRASTS)}, "
                                 f"got {self.contrast!r}")

    def to_dict(self) -> dict:
        # "contrast" only where there is one: records and feature keys from before it stay as they were.
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation} | ({"contrast": self.contrast} if self.contrast != "none" else {})

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        try:
            return cls(input_size=int(d["input_size"]), mean=tuple(float(v) for v in d["mean"]),
                       std=tuple(float(v) for v in d["std"]), interpolation=str(d["interpolation"]),
                       contrast=str(d.get("contrast", "none")))
        except (KeyError, TypeError, ValueError) as error:
            raise XferlearnError(f"preprocessing record is malformed ({error!r}); "
                                 "it needs input_size, mean, std and interpolation") from None


class UnreadableImage(ValueError):
    """A file that is not a decodable image; the message is the reason."""


_DEEP = ("I;16", "I;16B", "I;16L", "I", "F")


def _rescaled(image: Image.Image) -> Image.Image:
    """A 16-bit or float image in 8 bits (mode L), rescaled by its own range."""
    values = np.asarray(image)
    lo, hi = float(values.min()), float(values.max())
    scaled = np.zeros(values.shape, dtype=np.uint8)
    if hi > lo:  # the same arithmetic as on the whole array, a block of rows at a time
        for start in range(0, len(values), _ROWS_AT_ONCE):
            block = values[start:start + _ROWS_AT_ONCE].astype(np.float64)
            scaled[start:start + _ROWS_AT_ONCE] = ((block - lo) / (hi - lo) * 255.0).round()
    return Image.fromarray(scaled)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB in 8 bits, whatever the mode: 16-bit and float images are rescaled by their own range."""
    if image.mode in _DEEP:
        image = _rescaled(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on black: X-ray backgrounds are black, and transparent pixels carry no data.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decoded_bytes(image: Image.Image) -> int:
    """What `image` takes once decoded, from its header: width x height x channels x bytes per sample."""
    try:
        mode = ImageMode.getmode(image.mode)
        per_pixel = len(mode.bands) * np.dtype(mode.typestr).itemsize
    except (KeyError, TypeError):  # a rare mode PIL has no description of: assume the widest samples
        per_pixel = 4 * len(image.getbands())
    return image.size[0] * image.size[1] * per_pixel


def decode(data: bytes, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode image bytes to a (size, size, 3) uint8 array; raise UnreadableImage with the reason."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb warning fires below MAX_PIXELS; its error (at twice its limit) stays.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise UnreadableImage(f"too many pixels (decompression bomb guard): {width}x{height} is over "
                                          f"{MAX_PIXELS:,}")
                if image.format == "JPEG":
                    # JPEG decodes at 1/2, 1/4 or 1/8 scale in its DCT for little cost: the smallest
                    # scale still at least `size` on both sides; the exact resize follows below.
                    image.draft(None, (size, size))
                needed = decoded_bytes(image)
                if needed > MAX_DECODE_BYTES:
                    raise UnreadableImage(f"too large to decode: {image.size[0]}x{image.size[1]} {image.mode} takes "
                                          f"{needed / 2**20:.0f} MB, over the {MAX_DECODE_BYTES / 2**20:.0f} MB "
                                          "budget per image")
                image.load()  # forces the full decode, so a truncated file fails here
                image = ImageOps.exif_transpose(image)
                if image.mode in (*_DEEP, "L") and image.size != (size, size):
                    # Gray: to 8 bits and resized before it becomes RGB (the same pixels, a third of the memory).
                    image = (_rescaled(image) if image.mode in _DEEP else image).resize((size, size),
                                                                                        _RESAMPLE[interpolation])
                image = _to_rgb(image)
                if image.size != (size, size):
                    image = image.resize((size, size), _RESAMPLE[interpolation])
                return np.asarray(image, dtype=np.uint8).copy()
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"too many pixels (decompression bomb guard): {error}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image (no decoder recognises it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise UnreadableImage(f"corrupt image: {error}") from None


def decode_file(path: str | Path, size: int, interpolation: str = "bilinear") -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UnreadableImage(f"cannot read file: {error.strerror or error}") from None
    return decode(data, size, interpolation)


def default_cache_dir() -> Path:
    root = os.environ.get("XFERLEARN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "xferlearn")
    return Path(root)


def progress_bar(items, total: int, description: str, quiet_below: int = 64):
    """`items`, with a transient progress bar on stderr while they come (rich's `track`): for
    the steps a user waits for. Invisible where stderr is not a terminal, and for a few items."""
    if total < quiet_below:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, total=total, description=description, transient=True, console=Console(stderr=True))


class DecodeCache:
    """Decoded arrays on disk, one .npy per (content hash, size, interpolation).

    Per-image files rather than one big array: a new folder that shares most of its
    images with an old one (a slice, a superset, a re-split) reuses every one of them.
    A gray image (every X-ray) is stored as one channel, a third of the bytes to write and
    read, and given back as RGB. A cache that cannot be written (read-only or full disk) is
    skipped, never fatal. It stores the decoded pixels as they are; `contrast` is the step the
    datasets built on it apply after augmentation (data/contrast.py), so runs with and without
    it share one cache.
    """

    def __init__(self, root: Path | None = None, size: int = 224, interpolation: str = "bilinear",
                 contrast: str = "none"):
        self.root = Path(root or default_cache_dir()) / "decoded" / f"{size}-{interpolation}"
        self.size = size
        self.interpolation = interpolation
        self.contrast = contrast
        self.writable = True

    @classmethod
    def of(cls, preprocessing: Preprocessing, root: Path | str | None = None) -> DecodeCache:
        """The cache of the arrays a model with `preprocessing` takes."""
        return cls(root, preprocessing.input_size, preprocessing.interpolation, preprocessing.contrast)

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npy"

    def contains(self, digest: str) -> bool:
        return self._path(digest).exists()

    def put(self, data: bytes, digest: str) -> np.ndarray:
        """Decode bytes already in memory and store the array (scan reads each file only once)."""
        array = decode(data, self.size, self.interpolation)
        if self.writable:
            buffer = io.BytesIO()
            np.save(buffer, array[..., 0] if is_gray(array) else array, allow_pickle=False)
            try:
                atomic_write(self._path(digest), buffer.getvalue(), durable=False)
            except XferlearnError:  # a full or read-only cache costs decoding again, never the run
                self.writable = False
        return array

    def get(self, path: str | Path, digest: str | None = None) -> np.ndarray:
        """The decoded array of a file; decodes and stores it on the first call only."""
        if digest is not None and self.contains(digest):
            try:
                stored = np.load(self._path(digest), allow_pickle=False)
                return np.repeat(stored[..., None], 3, axis=2) if stored.ndim == 2 else stored
            except (OSError, ValueError):
                self._path(digest).unlink(missing_ok=True)  # a damaged entry is rebuilt, not trusted
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise UnreadableImage(f"cannot read file: {error.strerror or error}") from None
        return self.put(data, digest or content_hash(data))

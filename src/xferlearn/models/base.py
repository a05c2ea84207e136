"""What every prediction engine shares, in numpy alone: decoding as training did, the decision
rule, result rows and streaming. PyTorch (predictor.py) and ONNX Runtime (deploy/onnx_runtime.py)
each supply `probabilities`; this module imports neither, so an ONNX engine starts without torch.
"""

from __future__ import annotations

import io
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.contrast import equalize
from ..data.images import Preprocessing, UnreadableImage, decode, decode_file
from ..errors import XferlearnError


def usable_cores() -> int:
    """The cores this process may use (containers and taskset narrow them), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is here, without importing torch (its driver lists the GPUs in /proc)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def run_fixed(session, input_name: str, output_name: str, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """`session` (its batch axis fixed at `batch_size`) over `pixels` of any length: in chunks of
    that size, the last one padded with zeros and its padding dropped from the output."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    outputs = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.uint8)])
        outputs.append(session.run([output_name], {input_name: chunk})[0][:n])
    return np.concatenate(outputs)


def array_image(array: np.ndarray) -> Image.Image:
    """An image as an array: H x W (grayscale) or H x W x 1, 3 or 4 (channels last), uint8 or
    uint16, or floats in [0, 1]; anything else is an unreadable image (its row says why)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    shaped = array.size and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)))
    if shaped and array.dtype.kind == "f" and np.isfinite(array).all() and 0 <= array.min() <= array.max() <= 1:
        array = np.round(array * 255).astype(np.uint8)
    if shaped and (array.dtype == np.uint8 or (array.dtype == np.uint16 and array.ndim == 2)):
        return Image.fromarray(array)
    raise UnreadableImage(f"an array image must be H x W or H x W x 1, 3 or 4 (channels last), uint8 (uint16 if "
                          f"grayscale) or floats in [0, 1]; this one is {array.shape} {array.dtype}")


class BasePredictor(ABC):
    """What every engine shares: decoding as training did, the decision rule, result rows and
    streaming. An engine (PyTorch in predictor.py, ONNX Runtime in deploy/onnx_runtime.py) supplies `probabilities`."""

    def __init__(self, classes: list[str], threshold: float | None, positive_index: int | None,
                 temperature: float, preprocessing: Preprocessing):
        self.classes = classes
        self.threshold = threshold
        self.positive_index = positive_index
        self.temperature = temperature
        self.preprocessing = preprocessing

    @abstractmethod
    def probabilities(self, batch) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, C) calibrated class probabilities."""

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices: the validation threshold on the positive class for two classes, argmax otherwise."""
        if self.positive_index is None or self.threshold is None:
            return probs.argmax(axis=1)
        other = 1 - self.positive_index
        return np.where(probs[:, self.positive_index] >= self.threshold, self.positive_index, other)

    # --- convenience for users ----------------------------------------------------------
    def decode(self, item) -> np.ndarray:
        """A path, bytes, PIL image or HxWxC array -> the (size, size, 3) uint8 array training used
        (decoded, then its contrast equalised where the run does)."""
        return equalize(self._decode(item), self.preprocessing.contrast)

    def _decode(self, item) -> np.ndarray:
        size, interpolation = self.preprocessing.input_size, self.preprocessing.interpolation
        if isinstance(item, (str, Path)):
            return decode_file(item, size, interpolation)
        if isinstance(item, (bytes, bytearray)):
            return decode(bytes(item), size, interpolation)
        if isinstance(item, np.ndarray):
            item = array_image(item)
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            return decode(buffer.getvalue(), size, interpolation)
        raise XferlearnError(f"cannot predict on a {type(item).__name__}: give paths, bytes, PIL images or arrays.")

    def row(self, name: str, probs: np.ndarray | None, error: str | None = None) -> dict:
        if probs is None:
            return {"file": name, "class": None, "probabilities": None, "threshold": self.threshold, "error": error}
        label = int(self.decide(probs[None])[0])
        return {"file": name, "class": self.classes[label],
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                "threshold": self.threshold, "error": None}

    def iter_predict(self, items: Iterable, batch_size: int = 32, workers: int | None = None) -> Iterator[dict]:
        """Stream one result row per item; decoding runs in threads while the model computes."""
        items = list(items)
        names = [str(i) if isinstance(i, (str, Path)) else f"<{type(i).__name__} {n}>" for n, i in enumerate(items)]

        def safe_decode(item):
            try:
                return self.decode(item), None
            except UnreadableImage as error:
                return None, str(error)

        starts = range(0, len(items), batch_size)
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            # One batch decodes (PIL releases the GIL) while the previous one is in the network.
            def submit(start):
                return [pool.submit(safe_decode, item) for item in items[start:start + batch_size]]

            pending = [submit(starts[0])] if starts else []
            for k, start in enumerate(starts):
                if k + 1 < len(starts):
                    pending.append(submit(starts[k + 1]))
                decoded = [future.result() for future in pending.pop(0)]
                good = [k for k, (array, _) in enumerate(decoded) if array is not None]
                probs = self.probabilities(np.stack([decoded[k][0] for k in good]).transpose(0, 3, 1, 2)) \
                    if good else np.zeros((0, len(self.classes)))
                by_index = dict(zip(good, probs))
                for k, (_, error) in enumerate(decoded):
                    yield self.row(names[start + k], by_index.get(k), error)

    def predict(self, items, batch_size: int = 32) -> list[dict]:
        """Predict on one item or a list: paths, bytes, PIL images or arrays."""
        single = not isinstance(items, (list, tuple))
        rows = list(self.iter_predict([items] if single else items, batch_size))
        return rows[0] if single else rows

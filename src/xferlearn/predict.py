"""Prediction with a trained run: files, folders, arrays or PIL images in; classes out.

`load(run_dir)` gives a `Predictor` built from the checkpoint alone. It decodes exactly
as training did (squash to the input size, the weights' own normalisation), applies the
calibrated temperature, and decides with the threshold chosen on validation. Batches
stream: a folder of thousands of images never sits in memory at once, and an
unreadable file becomes a row with its error rather than the end of the run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import normalize
from .backbones import Preprocessing
from .checkpoint import Checkpoint, load_checkpoint
from .features import resolve_precision
from .images import IMAGE_EXTENSIONS, UnreadableImage, decode, decode_file


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders walked for image files (sorted, so output order is stable)."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(item)
    return paths


class BasePredictor:
    """What every engine shares: decoding as training did, the decision rule, result rows and
    streaming. An engine (PyTorch here, ONNX Runtime in export.py) supplies `probabilities`."""

    def __init__(self, classes: list[str], threshold: float | None, positive_index: int | None,
                 temperature: float, preprocessing: Preprocessing):
        self.classes = classes
        self.threshold = threshold
        self.positive_index = positive_index
        self.temperature = temperature
        self.preprocessing = preprocessing

    def probabilities(self, batch) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, C) calibrated class probabilities."""
        raise NotImplementedError

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices: the validation threshold on the positive class for two classes, argmax otherwise."""
        if self.positive_index is None or self.threshold is None:
            return probs.argmax(axis=1)
        other = 1 - self.positive_index
        return np.where(probs[:, self.positive_index] >= self.threshold, self.positive_index, other)

    # --- convenience for users ----------------------------------------------------------
    def decode(self, item) -> np.ndarray:
        """A path, bytes, PIL image or HxWxC array -> the (size, size, 3) uint8 array training used."""
        size, interpolation = self.preprocessing.input_size, self.preprocessing.interpolation
        if isinstance(item, (str, Path)):
            return decode_file(item, size, interpolation)
        if isinstance(item, (bytes, bytearray)):
            return decode(bytes(item), size, interpolation)
        if isinstance(item, np.ndarray):
            item = Image.fromarray(item)
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            return decode(buffer.getvalue(), size, interpolation)
        raise TypeError(f"cannot predict on a {type(item).__name__}")

    def row(self, name: str, probs: np.ndarray | None, error: str | None = None) -> dict:
        if probs is None:
            return {"file": name, "class": None, "probabilities": None, "threshold": self.threshold, "error": error}
        label = int(self.decide(probs[None])[0])
        return {"file": name, "class": self.classes[label],
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                "threshold": self.threshold, "error": None}

    def iter_predict(self, items: Iterable, batch_size: int = 64, workers: int | None = None) -> Iterator[dict]:
        """Stream one result row per item; decoding runs in threads while the model computes."""
        items = list(items)
        names = [str(i) if isinstance(i, (str, Path)) else f"<{type(i).__name__} {n}>" for n, i in enumerate(items)]

        def safe_decode(item):
            try:
                return self.decode(item), None
            except UnreadableImage as error:
                return None, str(error)

        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            for start in range(0, len(items), batch_size):
                decoded = list(pool.map(safe_decode, items[start:start + batch_size]))
                good = [k for k, (array, _) in enumerate(decoded) if array is not None]
                probs = self.probabilities(torch.from_numpy(np.stack([decoded[k][0] for k in good])).permute(0, 3, 1, 2)) \
                    if good else np.zeros((0, len(self.classes)))
                by_index = dict(zip(good, probs))
                for k, (_, error) in enumerate(decoded):
                    yield self.row(names[start + k], by_index.get(k), error)

    def predict(self, items, batch_size: int = 64) -> list[dict]:
        """Predict on one item or a list: paths, bytes, PIL images or arrays."""
        single = not isinstance(items, (list, tuple))
        rows = list(self.iter_predict([items] if single else items, batch_size))
        return rows[0] if single else rows


class Predictor(BasePredictor):
    """A trained classifier ready to use, computing with PyTorch; build it with `load(run_dir)`."""

    def __init__(self, checkpoint: Checkpoint, device: str | None = None, precision: str = "fp32"):
        super().__init__(checkpoint.classes, checkpoint.threshold, checkpoint.positive_index,
                         checkpoint.temperature, Preprocessing.from_dict(checkpoint.preprocessing))
        self.checkpoint = checkpoint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        self.model = checkpoint.build_model().to(self.device, memory_format=torch.channels_last)

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> the normalised float tensor the network takes."""
        x = normalize(batch, self.preprocessing.mean, self.preprocessing.std)
        return x.to(self.device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.to_input(batch)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x).float()

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, C) calibrated class probabilities."""
        return (self.logits(batch) / self.temperature).softmax(dim=1).cpu().numpy()


def load(run: str | Path, device: str | None = None, precision: str = "fp32") -> Predictor:
    """The trained classifier in a run folder (or checkpoint file), ready to predict."""
    return Predictor(load_checkpoint(run), device, precision)


def write_rows(rows: Iterable[dict], classes: list[str], fmt: str = "csv", out=None) -> int:
    """Stream rows as CSV (one probability column per class) or a JSON array; returns the count."""
    out = out or sys.stdout
    count = 0
    if fmt == "json":  # a JSON array, written row by row so that output streams
        out.write("[")
        for row in rows:
            out.write(("," if count else "") + "\n " + json.dumps(row))
            count += 1
        out.write("\n]\n")
        return count
    writer = csv.writer(out)
    writer.writerow(["file", "class", *[f"p_{c}" for c in classes], "threshold", "error"])
    for row in rows:
        probs = row["probabilities"] or {}
        writer.writerow([row["file"], row["class"] or "", *[f"{probs[c]:.6f}" if c in probs else "" for c in classes],
                         "" if row["threshold"] is None else f"{row['threshold']:.6f}", row["error"] or ""])
        count += 1
    return count

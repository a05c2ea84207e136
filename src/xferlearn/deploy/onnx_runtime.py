"""Running an ONNX export with ONNX Runtime, behind the same interface as the PyTorch `Predictor`.

An export folder holds the model (`model.onnx`, and `model.int8.onnx` once quantised) and
the sidecar `model.json`, the consumer's contract: classes, positive class, threshold and
where it came from, temperature, preprocessing, test-time augmentation. This module names
those files and reads them; it needs ONNX Runtime and torch (for the TTA views) but not
timm or Lightning, so predicting from an export starts fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._io import read_json
from ..data.augment import tta_views
from ..data.images import Preprocessing
from ..errors import XferlearnError
from ..models.predictor import BasePredictor
from ..rundir import RunDir

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INT8_FILE = "model.int8.onnx"
SIDECAR = "model.json"
SIDECAR_FORMAT = "xferlearn-export"
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"

def export_dir(run: str | Path) -> Path:
    """Where `export` writes by default: RUN/export (beside the checkpoint file if given one)."""
    return RunDir.of(run).export


def read_sidecar(path: Path) -> dict:
    record = read_json(path)
    return record if isinstance(record, dict) and record.get("format") == SIDECAR_FORMAT else {}


class OnnxPredictor(BasePredictor):
    """An ONNX export run by ONNX Runtime, with Predictor's interface (decode, decide, row,
    iter_predict, predict). Build it from an export folder, a model.onnx, or `load_onnx(run)`.
    `int8` runs the folder's model.int8.onnx at its own validation threshold. Test-time
    augmentation follows the export (the sidecar's `tta`), as the threshold was chosen with it."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 int8: bool = False, model_file: str | Path | None = None):
        import onnxruntime

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        card = read_sidecar(folder / SIDECAR)
        int8 = int8 or path.name == INT8_FILE
        name = INT8_FILE if int8 else FORMATS["onnx"]
        model = Path(model_file) if model_file else (folder / name if path.is_dir() else path)
        if not model.is_file() or not card:
            raise XferlearnError(f"No ONNX export at {path}: it needs {name} and {SIDECAR} "
                                 f"(make them with `xferlearn export RUN --format {'onnx-int8' if int8 else 'onnx'}`).")
        if int8 and "int8" not in card:
            raise XferlearnError(f"{folder / SIDECAR} does not record the int8 model's validation check; "
                                 "export it again with `xferlearn export RUN --format onnx-int8`.")
        threshold = card["int8"]["threshold"] if int8 else card["threshold"]
        super().__init__(card["classes"], threshold, card["positive_index"], card["temperature"],
                         Preprocessing.from_dict(card["preprocessing"]))
        self.card = card
        self.tta = bool(card.get("tta", {}).get("on", False))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or _usable_cores()
        self.session = onnxruntime.InferenceSession(str(model), options,
                                                    providers=providers or ["CPUExecutionProvider"])

    def probabilities(self, batch) -> np.ndarray:
        """(N, 3, H, W) uint8 tensor or array -> (N, C) calibrated class probabilities."""
        batch = torch.as_tensor(batch)
        if batch.dtype != torch.uint8:
            raise ValueError(f"the exported model takes uint8 pixels (0..255), not {batch.dtype}")
        views = tta_views(batch) if self.tta else [batch]
        pixels = np.ascontiguousarray((torch.cat(views) if self.tta else batch).numpy())
        probs = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        return probs.reshape(len(views), len(batch), -1).mean(axis=0)


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use (containers, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

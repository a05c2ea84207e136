"""Running an ONNX export with ONNX Runtime, behind the same interface as the PyTorch `Predictor`.

An export folder holds the model (`model.onnx`, and `model.int8.onnx` once quantised) and
the sidecar `model.json`, the consumer's contract: classes, positive class, threshold and
where it came from, temperature, preprocessing, test-time augmentation. This module names
those files and reads them; it needs ONNX Runtime, and torch only for the TTA views of an
export made with them: predicting from an export starts without torch, timm or Lightning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._io import file_sha256, read_json
from ..data.images import Preprocessing
from ..errors import XferlearnError
from ..models.base import BasePredictor, run_fixed, usable_cores
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


def int8_checked(card: dict) -> bool:
    """Whether the sidecar records an int8 model that passed the current validation check: its AUC
    and its rank agreement with fp32. Older int8 models were checked on AUC alone, which a
    saturated validation split cannot fail; they count as absent and are made again on first use."""
    return "rank_agreement" in card.get("int8", {}).get("validation", {})


def export_current(folder: Path, checkpoint: Path, fmt: str = "onnx") -> bool:
    """Whether `folder` holds a `fmt` export ("onnx" or "onnx-int8") of the checkpoint file as it is now."""
    card = read_sidecar(folder / SIDECAR)
    name = INT8_FILE if fmt == "onnx-int8" else FORMATS["onnx"]
    if fmt == "onnx-int8" and not int8_checked(card):
        return False
    return (fmt in card.get("files", {}) and (folder / name).is_file() and checkpoint.is_file()
            and card.get("checkpoint_sha256") == file_sha256(checkpoint))


class OnnxPredictor(BasePredictor):
    """An ONNX export run by ONNX Runtime, with Predictor's interface (decode, decide, row,
    iter_predict, predict). Build it from an export folder, a model.onnx, or `load_onnx(run)`.
    `int8` runs the folder's model.int8.onnx at its own validation threshold. Test-time
    augmentation follows the export (the sidecar's `tta`), as the threshold was chosen with it.
    `batch_size` fixes the graph's batch axis at that size (batches are cut and padded to it):
    ONNX Runtime plans a fixed shape a little better (EfficientNet-Lite0's export, 2 AVX2
    cores: 123 against 118 images/s at batch 32); worth it for bulk prediction, not for a
    service's batches of 1 to 32, which padding would cost more."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 int8: bool = False, model_file: str | Path | None = None, batch_size: int | None = None):
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
        self.threshold_source = (card["int8"] if int8 else card).get("threshold_source", "")
        self.tta = bool(card.get("tta", {}).get("on", False))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        # No spin-waiting between operators: the threads decoding the next batch (predict) or the
        # next uploads (serve) need those cycles. Interleaved side by side on a shared 2-core
        # machine, int8 prediction end to end ran 1.3-1.5x faster without it (benchmarks/RESULTS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if batch_size:
            options.add_free_dimension_override_by_name("batch", batch_size)
        self.session = onnxruntime.InferenceSession(str(model), options,
                                                    providers=providers or ["CPUExecutionProvider"])
        fixed = self.session.get_inputs()[0].shape[0]
        self.batch_size = fixed if isinstance(fixed, int) else None  # None: a free axis (or its name differs)

    def probabilities(self, batch) -> np.ndarray:
        """(N, 3, H, W) uint8 tensor or array -> (N, C) calibrated class probabilities."""
        batch = np.asarray(batch)
        if batch.dtype != np.uint8:
            raise ValueError(f"the exported model takes uint8 pixels (0..255), not {batch.dtype}")
        views = 1
        if self.tta:  # the views are torchvision's, as in training: torch only here
            import torch

            from ..data.augment import tta_views

            pixels = tta_views(torch.from_numpy(np.ascontiguousarray(batch)))
            views, batch_views = len(pixels), torch.cat(pixels).numpy()
        else:
            batch_views = batch
        if self.batch_size:
            probs = run_fixed(self.session, INPUT_NAME, OUTPUT_NAME, batch_views, self.batch_size)
        else:
            probs = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch_views)})[0]
        return probs.reshape(views, len(batch), -1).mean(axis=0)

"""Export a run as ONNX or TorchScript, with everything a consumer needs beside it.

The exported graph takes what a decoder gives: uint8 RGB pixels, NCHW, 0..255, already
squashed (not cropped) to the input size. Normalisation and the calibrated temperature
softmax are inside it, so it returns class probabilities that sum to 1, the same numbers
`xferlearn predict` reports. The sidecar `model.json` holds the class names, the positive
class, the decision threshold and where it came from, the temperature, the input size,
mean/std and interpolation, the backbone and the versions, and, where the threshold was
chosen on test-time-augmented probabilities, the views to average over. The batch axis is
dynamic. `--format onnx-int8` adds an int8 quantisation of the ONNX graph (quantize.py).

Each export is checked before it is kept: the ONNX graph by `onnx.checker`, and both
formats by comparing their outputs with PyTorch's on a batch of a size the export never
saw. `OnnxPredictor` (onnx_runtime.py) runs an export with ONNX Runtime behind the same
interface as `Predictor` (averaging over the TTA views where the sidecar says so);
`load_onnx(run)` (predict.py) exports on first use.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .._io import atomic_write, file_sha256, os_error, write_json
from ..data.augment import TTA_VIEWS
from ..data.contrast import DESCRIPTION as CONTRAST
from ..data.images import Preprocessing
from ..errors import XferlearnError
from ..models.checkpoint import Checkpoint, load_checkpoint
from ..models.inference import NormalizedInput
from ..rundir import RunDir, checkpoint_path
from ..config import EXPORT_FORMATS
from .onnx_runtime import (FORMATS, INPUT_NAME, INT8_FILE, OUTPUT_NAME, SIDECAR, SIDECAR_FORMAT,
                           export_current, export_dir, read_sidecar)

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest accepted |p_export - p_torch| on the verification batch
_PROTOBUF_LIMIT = 1.8e9  # ONNX protobufs stop at 2 GB; larger weights go to a .data file beside


class DeployableClassifier(torch.nn.Module):
    """uint8 pixels (N, 3, S, S) in 0..255 -> calibrated class probabilities (N, C)."""

    def __init__(self, model: torch.nn.Module, preprocessing: Preprocessing, temperature: float):
        super().__init__()
        # The fast path's own normalisation (fp32 arithmetic), so exported and PyTorch outputs agree.
        self.network = NormalizedInput(model, preprocessing.mean, preprocessing.std, torch.float32)
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (self.network(pixels) / self.temperature).softmax(dim=1)


def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None,
           calibration: str | Path | None = None) -> dict[str, Path]:
    """Export a run's model; returns {"model": file, "sidecar": model.json} (plus "data" for
    ONNX weights too large for one file). "onnx-int8" quantises the ONNX export (see
    quantize.py; `calibration` names a folder of images to measure activation ranges on)."""
    rundir = RunDir.of(run)
    with rundir.lock_writes_to(out if out else rundir.root, "export"):
        return _export(run, fmt, out, calibration)


def _export(run, fmt: str, out, calibration) -> dict[str, Path]:
    if fmt == "onnx-int8":
        from .quantize import export_int8

        return export_int8(run, ensure_onnx(run, out), calibration)
    if fmt not in FORMATS:
        raise XferlearnError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}.")
    checkpoint = load_checkpoint(run)
    out = Path(out) if out else export_dir(run)
    if out.exists() and not out.is_dir():
        raise XferlearnError(f"{out} is a file; --out needs a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise os_error(out, error, "create") from None
    preprocessing = checkpoint.preprocessing
    module = DeployableClassifier(checkpoint.build_model(), preprocessing, checkpoint.temperature).eval()
    size = preprocessing.input_size
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=generator)
    check = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        expected = module(check).numpy()

    # Build in a private folder inside `out`, then rename into place: a failed or interrupted
    # export never leaves a half-written model where a consumer would pick it up.
    try:
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
    except OSError as error:
        raise os_error(out, error) from None
    try:
        target = staging / FORMATS[fmt]
        try:
            if fmt == "onnx":
                exporter, got = _export_onnx(module, example, check, target)
            else:
                exporter, got = _export_torchscript(module, example, check, target)
        except OSError as error:  # a full disk while the exporter writes: one line, the staging folder removed
            raise os_error(out / FORMATS[fmt], error) from None
        difference = float(np.abs(got - expected).max())
        if not difference <= TOLERANCE:
            raise RuntimeError(f"the {fmt} export disagrees with PyTorch by {difference:.2e} (more than "
                               f"{TOLERANCE:g}) on a {len(check)}-image batch; it was not kept")
        written = {"model": out / FORMATS[fmt]}
        for made in staging.iterdir():  # the model, and an ONNX .data file where there is one
            if made.name != FORMATS[fmt]:
                written["data"] = out / made.name
            try:
                os.replace(made, out / made.name)
            except OSError as error:
                raise os_error(out / made.name, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = _sidecar(checkpoint, run, out, fmt, exporter, difference, len(check))
    write_json(out / SIDECAR, record)
    written["sidecar"] = out / SIDECAR
    return written


def _export_onnx(module, example, check, target: Path) -> tuple[str, np.ndarray]:
    import onnx
    import onnxruntime

    external = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > _PROTOBUF_LIMIT
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    try:  # the torch.export-based exporter: PyTorch's supported path
        with warnings.catch_warnings():
            # torch 2.11's torch.export copies pytree specs through a deprecated check; the notice
            # reached `xferlearn export` users (seen on the H200 machine, session 13).
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            torch.onnx.export(module, (example,), str(target), dynamo=True, external_data=external, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        exporter = "torch.onnx.export (torch.export-based)"
    except Exception as error:  # some models trace only with the older TorchScript-based exporter
        log.warning("the torch.export-based ONNX exporter failed (%s); using the TorchScript-based one",
                    str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__)
        for leftover in target.parent.iterdir():
            leftover.unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(module, (example,), str(target), dynamo=False, opset_version=17,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **names)
        exporter = "torch.onnx.export (TorchScript-based)"
    onnx.checker.check_model(str(target))  # by path, so weights in a .data file are checked too
    opset = max(o.version for o in onnx.load(str(target), load_external_data=False).opset_import if o.domain == "")
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0]
    return f"{exporter}, opset {opset}", got


def _export_torchscript(module, example, check, target: Path) -> tuple[str, np.ndarray]:
    # torch.jit is deprecated in favour of torch.export, but TorchScript is still what
    # LibTorch (C++) and older mobile runtimes load; its warnings say nothing a user can act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        atomic_write(target, buffer.getvalue())
        with torch.no_grad():
            got = torch.jit.load(str(target), map_location="cpu")(check).numpy()
    return f"torch.jit.trace, torch {torch.__version__}", got


def _sidecar(checkpoint: Checkpoint, run, out: Path, fmt: str, exporter: str, difference: float, n: int) -> dict:
    """The consumer's contract. One sidecar serves both formats (the same graph); a sidecar left
    by an export of another checkpoint is replaced, and its model files removed."""
    pre = checkpoint.preprocessing
    digest = file_sha256(checkpoint_path(run))
    previous = read_sidecar(out / SIDECAR)
    if previous.get("checkpoint_sha256") != digest:
        for other, name in [*FORMATS.items(), ("onnx-int8", INT8_FILE)]:
            if other != fmt:
                (out / name).unlink(missing_ok=True)
        previous = {}
    files = {k: v for k, v in previous.get("files", {}).items() if k != fmt and (out / v).exists()}
    files[fmt] = FORMATS[fmt]
    int8 = {"int8": previous["int8"]} if "onnx-int8" in files and "int8" in previous else {}
    size, classes = pre.input_size, checkpoint.classes
    if checkpoint.positive_index is None or checkpoint.threshold is None:
        rule = "the class with the highest probability"
    else:
        rule = (f"{checkpoint.positive_class} when probabilities[:, {checkpoint.positive_index}] >= "
                f"threshold, else {classes[1 - checkpoint.positive_index]}")
    return {
        "format": SIDECAR_FORMAT, "format_version": 1,
        "files": files,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "uint8", "range": "0..255", "color": "RGB",
                  "shape": ["batch", 3, size, size],
                  "prepare": f"decode, convert to RGB, squash (resize without cropping) to {size}x{size} "
                             f"with {pre.interpolation} resampling; feed the pixels as they are"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)],
                   "meaning": "calibrated class probabilities, softmax(logits / temperature); rows sum to 1"},
        "normalisation_in_graph": True, "temperature_softmax_in_graph": True,
        "classes": classes, "positive_class": checkpoint.positive_class,
        "positive_index": checkpoint.positive_index,
        "threshold": checkpoint.threshold, "threshold_source": checkpoint.threshold_source,
        "decision_rule": rule, "temperature": checkpoint.temperature,
        "tta": {"on": True, "views": [{"scale": scale, "shift": list(shift)} for scale, shift in TTA_VIEWS],
                "how": "the threshold was chosen on probabilities averaged over these views of each image (zoom "
                       "about the centre, shift as a fraction of the side, bilinear): average the model's "
                       "outputs over them to reproduce `xferlearn predict`"} if checkpoint.tta else {"on": False},
        "preprocessing": pre.to_dict() | {"note": "mean/std (0..1 scale) are already applied inside the graph"
                                          + (f"; the contrast step is not: apply it to each decoded image "
                                             f"first: {CONTRAST}" if pre.contrast == "clahe" else "")},
        "backbone": checkpoint.backbone, "arch": checkpoint.arch, "weights": checkpoint.weights,
        "xferlearn_version": __version__, "training_versions": checkpoint.versions,
        "exporters": {k: v for k, v in previous.get("exporters", {}).items() if k in files} | {fmt: exporter},
        "verification": {k: v for k, v in previous.get("verification", {}).items() if k in files}
        | {fmt: {"max_abs_probability_difference_vs_pytorch": difference, "batch": n, "tolerance": TOLERANCE}},
        "checkpoint_sha256": digest,
    } | int8


def ensure_onnx(run: str | Path, out: str | Path | None = None) -> Path:
    """The folder holding an fp32 ONNX export of the run's current checkpoint (RUN/export unless
    `out`), exported there first when missing or made from another checkpoint."""
    checkpoint = checkpoint_path(run)
    if not checkpoint.is_file():
        load_checkpoint(run)  # raises the usual "no checkpoint" error
    folder = Path(out) if out else export_dir(run)
    if not export_current(folder, checkpoint):
        from rich.console import Console

        log.info("exporting %s to %s for ONNX Runtime", run, folder)
        # Seconds to a minute (an ensemble), once per checkpoint: say so on a terminal while it runs.
        with Console(stderr=True).status(f"Exporting the model to ONNX for ONNX Runtime, once for this checkpoint "
                                         f"(into {folder})"):
            export(run, "onnx", folder)
    return folder

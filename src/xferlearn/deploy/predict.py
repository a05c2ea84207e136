"""Prediction engines for a run, and the rows they stream out.

`load_engine(run, engine)` gives a predictor with one interface (`iter_predict`, `predict`,
`classes`) whatever computes it: PyTorch (`torch`, the checkpoint itself), ONNX Runtime on
the fp32 export (`onnx`, exported on first use), or its int8 quantisation (`onnx-int8`,
quantised and checked against validation on first use). `write_rows` streams the rows as
CSV or JSON.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from ..config import ENGINES
from ..errors import XferlearnError
from ..rundir import checkpoint_path
from .export import ensure_onnx, export
from .onnx_runtime import FORMATS, INT8_FILE, SIDECAR, OnnxPredictor, read_sidecar

log = logging.getLogger(__name__)

def load_onnx(run: str | Path, threads: int | None = None, int8: bool = False) -> OnnxPredictor:
    """An ONNX Runtime predictor for a run (exported to RUN/export on first use, and again when
    the checkpoint has changed since), or for an export folder or .onnx file given directly.
    `int8` runs the quantised model, quantising it first where needed (see quantize.py)."""
    run = Path(run)
    if run.suffix == ".onnx" or (run.is_dir() and (run / SIDECAR).is_file() and not checkpoint_path(run).exists()):
        return OnnxPredictor(run, threads, int8=int8)
    folder = ensure_onnx(run)
    if int8 and ("int8" not in read_sidecar(folder / SIDECAR) or not (folder / INT8_FILE).is_file()):
        log.info("quantising %s to int8", folder / FORMATS["onnx"])
        export(run, "onnx-int8", folder)  # under the run's lock, as `xferlearn export` is
    return OnnxPredictor(folder, threads, int8=int8)


def load_engine(run: str | Path, engine: str = "torch", *, precision: str = "auto", compile: str = "auto",
                n_images: int | None = None, batch_size: int = 32, tta: bool | None = None,
                prevalence: float | None = None):
    """A predictor for `run` on `engine` (one of ENGINES)."""
    if engine not in ENGINES:
        raise XferlearnError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
    if engine == "torch":
        from ..models.predictor import load_predictor

        return load_predictor(run, precision=precision, compile=compile, n_images=n_images, batch_size=batch_size, tta=tta,
                    prevalence=prevalence)
    if precision not in ("fp32", "auto"):
        raise XferlearnError("--precision applies to --engine torch; ONNX engines run their export as it is.")
    if tta or prevalence is not None:
        raise XferlearnError("--tta and --prevalence apply to --engine torch; ONNX engines apply test-time "
                             "augmentation where the export's threshold was chosen with it.")
    return load_onnx(run, int8=engine == "onnx-int8")


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

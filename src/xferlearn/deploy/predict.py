"""Prediction engines for a run, and the rows they stream out.

`load_engine(run, engine)` gives a predictor with one interface (`iter_predict`, `predict`,
`classes`) whatever computes it: PyTorch (`torch`, the checkpoint itself), ONNX Runtime on
the fp32 export (`onnx`, exported on first use), or its int8 quantisation (`onnx-int8`,
quantised and checked against validation on first use). `auto`, the default, takes:
- the int8 model where it already exists for the run's current checkpoint (it passed its
  validation check; its own threshold comes with it). Quantising is never done unasked: it
  needs the run's training and validation images and half a minute, and it can be refused;
- else, on a machine without a GPU, the fp32 ONNX export: the same model to 1e-4 in
  probability (export.py checks it), 3.0x PyTorch's fp32 end to end on 2 AVX2 cores, and
  1.5x PyTorch's compiled bf16 on 2 cores of a Xeon with AMX (README). Exporting takes
  about 20 s, so it is done unasked only for a service or a prediction of ONNX_EXPORT_PAYS
  images or more, and only where the run folder takes the export; an existing export is
  used whatever the count;
- else PyTorch (on a GPU).
`write_rows` streams the rows as CSV or JSON.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from ..config import ENGINES, ONNX_EXPORT_PAYS
from ..errors import XferlearnError
from ..models.base import gpu_present
from ..rundir import checkpoint_path
from .onnx_runtime import (FORMATS, INT8_FILE, SIDECAR, OnnxPredictor, export_current, export_dir, int8_checked,
                           read_sidecar)

log = logging.getLogger(__name__)


def _is_export(run: Path) -> bool:
    """An export folder or .onnx file given directly, rather than a run folder."""
    return run.suffix == ".onnx" or (run.is_dir() and (run / SIDECAR).is_file() and not checkpoint_path(run).exists())


def load_onnx(run: str | Path, threads: int | None = None, int8: bool = False,
              batch_size: int | None = None) -> OnnxPredictor:
    """An ONNX Runtime predictor for a run (exported to RUN/export on first use, and again when
    the checkpoint has changed since), or for an export folder or .onnx file given directly.
    `int8` runs the quantised model, quantising it first where needed (see quantize.py);
    `batch_size` fixes the batch axis (OnnxPredictor)."""
    run = Path(run)
    if _is_export(run):
        return OnnxPredictor(run, threads, int8=int8, batch_size=batch_size)
    folder = export_dir(run)
    if not export_current(folder, checkpoint_path(run), "onnx-int8" if int8 else "onnx"):
        from .export import ensure_onnx  # torch: only when there is something to export

        folder = ensure_onnx(run)
    if int8 and (not int8_checked(read_sidecar(folder / SIDECAR)) or not (folder / INT8_FILE).is_file()):
        from .export import export  # it brings scikit-learn, which plain ONNX prediction never needs

        log.info("quantising %s to int8", folder / FORMATS["onnx"])
        export(run, "onnx-int8", folder)  # under the run's lock, as `xferlearn export` is
    return OnnxPredictor(folder, threads, int8=int8, batch_size=batch_size)


def int8_ready(run: str | Path) -> bool:
    """Whether `run` (a run folder, or an export folder) holds an int8 model that passed its
    validation check, made from the run's current checkpoint."""
    run = Path(run)
    if _is_export(run):
        return run.is_dir() and int8_checked(read_sidecar(run / SIDECAR)) and (run / INT8_FILE).is_file()
    return export_current(export_dir(run), checkpoint_path(run), "onnx-int8")


def resolve_engine(run: str | Path, engine: str = "auto", torch_options: bool = False,
                   n_images: int | None = None) -> str:
    """The engine `auto` stands for (see the module's docstring); any other is returned as it is.
    `torch_options`: the caller asked for something only PyTorch does (precision, TTA, prevalence).
    `n_images`: how many images are coming; None for a service, which lasts."""
    if engine not in ENGINES:
        raise XferlearnError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
    if engine != "auto":
        return engine
    if torch_options:
        chosen = "torch"
    elif int8_ready(run):
        chosen = "onnx-int8"
    elif gpu_present():
        chosen = "torch"
    elif n_images is None or n_images >= ONNX_EXPORT_PAYS or onnx_ready(run):
        chosen = "onnx"
    else:
        chosen = "torch"
    log.info("engine auto: %s", chosen)
    return chosen


def why_not_int8(run: str | Path, checkpoint=None) -> str:
    """One line on why `auto` does not run the int8 model, the fastest engine on a CPU: refused by
    its check for this checkpoint (model.json keeps the reason), not built (a site-calibrated run),
    or never made; "" where it is ready. `checkpoint`: the run's, where the caller has it loaded."""
    run = Path(run)
    if int8_ready(run):
        return ""
    folder = run if _is_export(run) else export_dir(run)
    card = read_sidecar(folder / SIDECAR) if folder.is_dir() else {}
    refused = card.get("int8_refused")
    current = _is_export(run) or export_current(folder, checkpoint_path(run), "onnx")
    if isinstance(refused, dict) and current and refused.get("checkpoint_sha256") == card.get("checkpoint_sha256"):
        return f"int8 refused by its check for this model: {refused.get('reason', 'no reason recorded')}"
    point = card.get("operating_point") if current else None  # the export's card: no torch to import
    if point is None and not _is_export(run):  # no export: PyTorch runs, so torch is loaded already
        from ..models.checkpoint import load_checkpoint

        point = (checkpoint or load_checkpoint(run)).operating_point.to_dict()
    if isinstance(point, dict) and point.get("when") == "calibrate" and point.get("value") is not None:
        return "int8 is not built for a site-calibrated run (its threshold was chosen on the site sample)"
    return ("int8 not made for this model (`xferlearn export RUN --format onnx-int8` quantises it and keeps it only "
            "if it passes its validation check)")


def onnx_ready(run: str | Path) -> bool:
    """Whether `run` holds an fp32 ONNX export of its current checkpoint (or is an export folder)."""
    run = Path(run)
    return _is_export(run) or export_current(export_dir(run), checkpoint_path(run), "onnx")


def load_engine(run: str | Path, engine: str = "auto", *, precision: str = "auto", compile: str = "auto",
                n_images: int | None = None, batch_size: int = 32, tta: bool | None = None,
                prevalence: float | None = None):
    """A predictor for `run` on `engine` (one of ENGINES); its `engine` attribute says which ran.
    Where many images are coming (`n_images` >= `batch_size`), ONNX Runtime runs at that one
    fixed batch size (OnnxPredictor); a service's batches vary, so its axis stays free."""
    asked = engine
    engine = resolve_engine(run, engine, torch_options=precision != "auto" or compile != "auto" or tta is not None
                            or prevalence is not None, n_images=n_images)
    if engine == "torch":
        from ..models.inference import default_device
        from ..models.predictor import load_predictor

        if precision == "auto" and default_device().type == "cpu":
            # On a CPU the threshold was chosen on fp32 scores (ONNX Runtime's, as evaluate and serve
            # compute them); bf16 moves probabilities by up to 0.05 and flips images near it.
            precision = "fp32"
        predictor = load_predictor(run, precision=precision, compile=compile, n_images=n_images,
                                   batch_size=batch_size, tta=tta, prevalence=prevalence)
        predictor.engine = engine
        return predictor
    if precision not in ("fp32", "auto"):
        raise XferlearnError("--precision applies to --engine torch; ONNX engines run their export as it is.")
    if tta or prevalence is not None:
        raise XferlearnError("--tta and --prevalence apply to --engine torch; ONNX engines apply test-time "
                             "augmentation where the export's threshold was chosen with it.")
    fixed = batch_size if n_images is not None and n_images >= batch_size else None
    try:
        predictor = load_onnx(run, int8=engine == "onnx-int8", batch_size=fixed)
    except (XferlearnError, OSError, RuntimeError) as error:
        if asked != "auto":
            raise
        # A default that cannot make its export (a read-only run folder, a full disk) keeps PyTorch.
        log.warning("engine auto: PyTorch, as the ONNX export could not be made (%s)", error)
        return load_engine(run, "torch", precision=precision, compile=compile, n_images=n_images,
                           batch_size=batch_size, tta=tta, prevalence=prevalence)
    predictor.engine = engine
    return predictor


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

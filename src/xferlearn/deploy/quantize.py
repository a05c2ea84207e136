"""int8 ONNX export: static quantisation, kept only where the validation split says accuracy holds.

`xferlearn export RUN --format onnx-int8` (or `predict --engine onnx-int8`, on first use)
turns the fp32 ONNX export into `model.int8.onnx` with ONNX Runtime's static quantiser:
weights int8 per output channel, activations uint8 with ranges measured on calibration
images, QDQ format, so that ONNX Runtime fuses them into int8 kernels (VNNI/AMX where the
CPU has them). The classifier stays in float: it is tiny, and it is where rounding turns
straight into changed decisions. (Keeping the first convolution in float too moved the
chest X-ray validation AUC by 0.0007 instead of 0.0009, for 12% less speed, measured by hand
in development: not worth it.)
On the 2-core benchmark machine this runs EfficientNet-Lite0 about 2x faster than the
fp32 export (benchmarks/speed.py has the figures).

Dynamic quantisation (int8 weights, activations quantised per batch at run time) is not
offered: ONNX Runtime turns its convolutions into ConvInteger, which ran Lite0 at 29 img/s
against fp32's 167 here, and validation AUC fell by 0.012 (measured by hand in development).

Calibration reads a sample of the run's *training* images (as listed in split.json), or a
folder the user names; never the validation split, which judges the result, nor a test set.

The check: the validation split goes through both exports (with test-time augmentation
where the threshold was chosen with it). The int8 model is kept only when its AUC is
within `AUC_TOLERANCE` of the fp32 export's and, within each class, it orders the images
as the fp32 export does (rank correlation at least `RANK_FLOOR`: a validation AUC near 1 is
blind to reordering that costs AUC where classes overlap); otherwise nothing is written and
the error says so. Its scores are not the fp32 ones, so it gets its own threshold, chosen on
its own validation probabilities by the checkpoint's rule; the sidecar (`model.json`, key `int8`)
records both operating points, the agreement of their decisions, and the calibration.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .._io import file_sha256, os_error, read_json, write_json
from ..config import MIN_VAL_PER_CLASS, THRESHOLDS
from ..data.layout import expand_paths
from ..data.contrast import equalize
from ..data.images import Preprocessing, UnreadableImage, decode_file
from ..errors import XferlearnError
from ..evaluation.metrics import compute_metrics
from ..evaluation.thresholds import choose_operating_point
from ..models.checkpoint import load_checkpoint
from ..rundir import RunDir
from .onnx_runtime import INPUT_NAME, INT8_FILE, SIDECAR, OnnxPredictor, read_sidecar

AUC_TOLERANCE = 0.002  # the most the validation AUC may move for the int8 model to be kept
# The least rank correlation, within each class, between the int8 and the fp32 model's scores on
# the validation images. A validation AUC near 1 cannot see an int8 model that shuffles images
# inside a class, and such a model loses ranking where the classes overlap, on images from
# elsewhere. Measured on the sharpness-conflict split (benchmarks/int8_check.py, sessions 11 and
# 13 of benchmarks/RESULTS.md), lowest correlation -> held-out AUC against fp32: Lite0 with 8-bit
# weights on a VNNI/AMX Xeon 0.964 -> +0.0003 (95% CI -0.0020 to +0.0026); Lite2 there 0.905 ->
# -0.0034; the default ensemble there 0.926 -> -0.0053; Lite0 with 7-bit weights (AVX2) 0.873 ->
# -0.0095; Lite1 on VNNI 0.850 -> -0.0099; the ensemble on AVX2 0.839 -> -0.0063. Validation AUC
# moved by 0.002 or less for all of them. The floor keeps the one that lost nothing and refuses
# every one that lost.
RANK_FLOOR = 0.95
RANK_MIN_IMAGES = MIN_VAL_PER_CLASS  # per class: fewer, and a rank correlation says little
CALIBRATION_IMAGES = 256
_METHOD = ("static, QDQ; weights int8 per output channel, activations uint8 (MinMax ranges, moving average); "
           "classifier in float")


def read_split(run: str | Path, expected_sha256: str | None = None) -> dict:
    """The run's split.json; with `expected_sha256` (the checkpoint's, recorded at training time),
    refused unless it is the very split the model was trained and validated on."""
    path = RunDir.of(run).split
    record = read_json(path)
    if not isinstance(record, dict):
        raise XferlearnError(f"int8 quantisation checks itself on the run's validation split, listed in {path}; "
                             "that file is missing or unreadable (was the run moved without it?).")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise XferlearnError(f"{path} is not the split this model was trained with (its hash differs from the one "
                             "recorded in the checkpoint); int8 quantisation must check itself on the model's own "
                             "validation split: put back the run's split.json.")
    return record


def decode_images(paths, pre: Preprocessing, what: str) -> np.ndarray:
    """(N, 3, S, S) uint8 of `paths`, each decoded (and its contrast equalised) as training did."""
    arrays = []
    for path in paths:
        try:
            arrays.append(equalize(decode_file(path, pre.input_size, pre.interpolation), pre.contrast))
        except (OSError, UnreadableImage) as error:
            raise XferlearnError(f"cannot read {path}, one of the {what} ({error}); int8 quantisation needs them "
                                 "where the run's split.json lists them.") from None
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()


def calibration_paths(split: dict, calibration: str | Path | None, n: int, seed: int = 0) -> tuple[list, str]:
    """A sample of at most `n` images to measure activation ranges on, and where it came from."""
    if calibration is not None:
        paths = expand_paths([calibration])
        source = f"{calibration} (given with --calibration)"
    else:
        paths = [entry["path"] for entry in split.get("train", [])]
        source = "the run's training split (split.json)"
    if not paths:
        raise XferlearnError(f"no calibration images found in {source}.")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(paths), min(n, len(paths)), replace=False))
    return [paths[i] for i in picked], f"{len(picked)} images sampled from {source}"


# Images per calibration call. ONNX Runtime runs the calibration graph (every activation feeding a
# ReduceMin/ReduceMax, graph optimisations off) with its memory arena, which grew with the batch:
# the three-member ensemble at 260 px peaked at 8.5 GB for one batch of 32 and 16 GB for two,
# against 4.7 GB at 8 whatever the number of images (session 11, benchmarks/RESULTS.md).
CALIBRATION_BATCH = 8


def quantize_onnx(fp32: Path, target: Path, calibration: np.ndarray, input_name: str,
                  batch: int = CALIBRATION_BATCH, seven_bit: bool | None = None) -> None:
    """Static int8 quantisation of `fp32` into `target`, ranges measured on `calibration`; 7-bit
    weights where this CPU has no VNNI (`seven_bit` None) or as `seven_bit` says."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + batch] for i in range(0, len(calibration), batch))

        def get_next(self):
            chunk = next(self.batches, None)
            return None if chunk is None else {input_name: chunk}

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    nodes = onnx.load(str(prepared), load_external_data=False).graph.node
    keep_float = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul", "Softmax")]
    # Without VNNI (AVX2-only CPUs) the u8 x s8 products of an int8 convolution are summed in
    # 16 bits and saturate: ONNX Runtime's remedy is 7-bit weights (reduce_range). Measured on an
    # AVX2 EPYC: validation AUC -0.040 with 8-bit weights, refused by the check below. With VNNI
    # (32-bit sums) 8-bit weights are exact in the products: Lite0 on a VNNI Xeon lost nothing on
    # held-out images with them and 0.0097 AUC with 7-bit ones (benchmarks/int8_check.py, session 13).
    quantize_static(str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
                    reduce_range=not cpu_has_vnni() if seven_bit is None else seven_bit, extra_options={"CalibMovingAverage": True})
    prepared.unlink()


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: keep full-range weights, the validation check still guards them
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _probabilities(predictor, images: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    return np.concatenate([predictor.probabilities(torch.from_numpy(images[i:i + batch]))
                           for i in range(0, len(images), batch)])


def rank_agreement(y: np.ndarray, p32: np.ndarray, p8: np.ndarray, classes: list[str],
                   min_images: int = RANK_MIN_IMAGES) -> dict[str, float]:
    """Per class with at least `min_images` validation images: the Spearman correlation between the
    two models' scores of those images, each image scored by the probability of the *other*
    classes (small numbers keep their precision where the class's own probability rounds to 1)."""
    from scipy.stats import spearmanr

    agreement = {}
    for k, name in enumerate(classes):
        rows, others = y == k, [j for j in range(len(classes)) if j != k]
        if rows.sum() >= min_images:
            a, b = p32[rows][:, others].sum(axis=1), p8[rows][:, others].sum(axis=1)
            if np.ptp(a) == 0 or np.ptp(b) == 0:  # no order in one of them: agreement only if neither has any
                agreement[name] = float(np.ptp(a) == np.ptp(b) == 0)
            else:
                agreement[name] = float(spearmanr(a, b).statistic)
    return agreement


def _figures(y: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None,
             positive: int | None = None) -> dict:
    """AUC, and accuracy, sensitivity and specificity at `threshold` (argmax where None)."""
    metrics = compute_metrics(y, probs, classes, threshold, "validation", positive)
    keys = ("auc", "accuracy", "sensitivity", "specificity")
    return {key: metrics[key] for key in keys if key in metrics} | {"threshold": threshold}


def export_int8(run: str | Path, folder: Path, calibration: str | Path | None = None,
                n_calibration: int = CALIBRATION_IMAGES, tolerance: float = AUC_TOLERANCE) -> dict[str, Path]:
    """Write FOLDER/model.int8.onnx beside the run's fp32 export in FOLDER and record it in
    FOLDER/model.json, if and only if its validation AUC is within `tolerance` of the fp32 export's
    and it orders each class's validation images as the fp32 export does (`RANK_FLOOR`)."""
    checkpoint = load_checkpoint(run)
    training_point = checkpoint.operating_point
    if training_point.when == "calibrate" and training_point.value is not None:
        # Its threshold was chosen on the site sample through the fp32 network; an int8 model would
        # need its own, chosen on that sample, which the run does not keep. Not built.
        raise XferlearnError("int8 export of a site-calibrated run is not built: its threshold was chosen on the "
                             "site sample, which the int8 model would need to choose its own on; use the fp32 "
                             "export (--format onnx), or make the int8 model in the run it was calibrated from.")
    pre = checkpoint.preprocessing
    split = read_split(run, checkpoint.split_sha256)
    paths, calibration_source = calibration_paths(split, calibration, n_calibration)
    calibration_images = decode_images(paths, pre, "calibration images")
    val = split.get("val", [])
    if len(val) < 2:
        raise XferlearnError("int8 quantisation needs a validation split to check itself on; this run has none.")
    val_images = decode_images([v["path"] for v in val], pre,
                               "validation images")
    val_y = np.array([v["label"] for v in val])

    try:
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".int8-"))
    except OSError as error:
        raise os_error(folder, error) from None
    try:
        target = staging / INT8_FILE
        try:
            quantize_onnx(folder / "model.onnx", target, calibration_images, INPUT_NAME)
        except OSError as error:  # a full disk while the quantiser writes: one line, the staging folder removed
            raise os_error(folder / INT8_FILE, error) from None
        fp32 = OnnxPredictor(folder)
        int8 = OnnxPredictor(folder, model_file=target)
        p32, p8 = _probabilities(fp32, val_images), _probabilities(int8, val_images)
        classes = checkpoint.classes
        # The run's own rule, on the int8 model's validation probabilities.
        method, sensitivity = training_point.method, training_point.target
        if method not in THRESHOLDS:  # an older checkpoint's recorded point: the rule its config names
            method = checkpoint.config.get("threshold", "youden")
            sensitivity = checkpoint.config.get("target_sensitivity")
        point = choose_operating_point(val_y, p8, checkpoint.positive_index, method, sensitivity,
                                       data="validation split",
                                       n=len(val_y), when="export", engine="int8",
                                       tta_views=training_point.tta_views)
        threshold = point.value
        positive = checkpoint.positive_index
        fp32_point = _figures(val_y, p32, classes, checkpoint.threshold, positive)  # at the threshold chosen in training
        int8_point = _figures(val_y, p8, classes, threshold, positive)
        difference = int8_point["auc"] - fp32_point["auc"]
        if not abs(difference) <= tolerance:
            _refuse(folder, f"it moved validation AUC by {difference:+.4f} ({fp32_point['auc']:.4f} -> "
                            f"{int8_point['auc']:.4f}), more than {tolerance}")
        agreement = rank_agreement(val_y, p32, p8, classes, RANK_MIN_IMAGES)
        worst = min(agreement, key=agreement.get, default=None)
        if worst is not None and agreement[worst] < RANK_FLOOR:
            _refuse(folder, f"it reorders the validation images within a class (rank correlation with the fp32 "
                            f"model {agreement[worst]:.3f} for {worst}, below {RANK_FLOOR})",
                    "on images from elsewhere, where the classes overlap, such a model ranks worse, which a "
                    "validation AUC near 1 cannot show; ")
        int8.threshold = threshold
        decisions_32, decisions_8 = fp32.decide(p32), int8.decide(p8)
        try:
            os.replace(target, folder / INT8_FILE)
        except OSError as error:
            raise os_error(folder / INT8_FILE, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    card = read_sidecar(folder / SIDECAR)
    card.pop("int8_refused", None)
    card["files"]["onnx-int8"] = INT8_FILE
    card["int8"] = {
        "threshold": threshold, "threshold_source": point.describe(), "operating_point": point.to_dict(),
        "method": _METHOD + ("" if cpu_has_vnni() else "; 7-bit weights (reduce_range: this CPU has no VNNI)"),
        "calibration": calibration_source + "; never validation or test images",
        "validation": {"images": len(val_y), "auc_tolerance": tolerance, "auc_difference": difference,
                       "fp32": fp32_point, "int8": int8_point,
                       "rank_agreement": agreement, "rank_floor": RANK_FLOOR,
                       "rank_note": "" if agreement else f"not measured: no class has {RANK_MIN_IMAGES} "
                                                          "validation images",
                       "same_decision": float(np.mean(decisions_32 == decisions_8)),
                       "max_abs_probability_difference": float(np.abs(p8 - p32).max())},
    }
    write_json(folder / SIDECAR, card)
    return {"model": folder / INT8_FILE, "sidecar": folder / SIDECAR}


def _refuse(folder: Path, reason: str, why_it_matters: str = "") -> None:
    """Record why this checkpoint's int8 model was not kept (in model.json, beside the fp32 export
    of the same checkpoint, so `predict` and `serve` can say why they run fp32), then refuse in one line."""
    card = read_sidecar(folder / SIDECAR)
    if card:
        card["int8_refused"] = {"checkpoint_sha256": card.get("checkpoint_sha256"), "reason": reason}
        write_json(folder / SIDECAR, card)
    raise XferlearnError(f"int8 quantisation was not kept: {reason}; {why_it_matters}"
                         "use the fp32 export (--engine onnx).")

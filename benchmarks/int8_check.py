"""Does int8 hold up on this CPU? A run's int8 model against its fp32 export, on validation and held-out images.

    python3 benchmarks/int8_check.py RUN HELD_OUT [--bits auto,7,8] [--threads 2] [--boot 2000]

`xferlearn export RUN --format onnx-int8` keeps an int8 model only where its validation AUC is
within 0.002 of fp32's and it orders each class's validation images as fp32 does (rank
correlation >= 0.98, deploy/quantize.py). On 2 AVX2 cores without VNNI (7-bit weights) no model
passed (rank correlations 0.83 to 0.87, held-out AUC -0.006 to -0.010; benchmarks/RESULTS.md,
session 11). This measures what that check sees and what it guards, on whatever CPU runs it:

- the CPU's int8 instructions (VNNI, AVX-VNNI, AMX), read from /proc/cpuinfo;
- per weight width (`auto`: what the export uses here, 8-bit with VNNI, 7-bit without; or `7`, `8`):
  the int8 model quantised by the library's own `quantize_onnx` from the export's calibration
  sample, then validation AUC and within-class rank correlation (the export's check), AUC on
  HELD_OUT (labelled images the run was not tuned on, e.g. a shifted split's val/ from
  benchmarks/shift_split.py) with the paired stratified-bootstrap difference against fp32, and
  the specificity and sensitivity at each model's own validation threshold (Youden's J);
- the network alone, fp32 and int8 side by side in one run: images/s on batches of 32 at
  `--threads` intra-op threads (decoding excluded; the upper bound `predict` can approach).

Nothing is written into RUN but its fp32 export (RUN/export), made if missing.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ensemble import paired_auc_cell  # benchmarks/ensemble.py, beside this file
from xferlearn.data.layout import expand_paths
from xferlearn.deploy import quantize
from xferlearn.deploy.export import ensure_onnx
from xferlearn.deploy.onnx_runtime import INPUT_NAME, OnnxPredictor
from xferlearn.evaluation.metrics import compute_metrics
from xferlearn.evaluation.thresholds import choose_threshold
from xferlearn.models.checkpoint import load_checkpoint


def cpu_line() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = sorted({flag for flag in info.split() if flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                               "amx_int8", "avx512_bf16")})
    return f"{model}; {', '.join(flags) or 'no AVX2'}"


def throughput(predictor: OnnxPredictor, images: np.ndarray, seconds: float = 5.0, batch: int = 32) -> float:
    """Images/s of the network alone (ONNX Runtime on uint8 batches), after one warm-up batch."""
    import torch

    chunk = torch.from_numpy(images[:batch])
    predictor.probabilities(chunk)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.probabilities(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("held_out")
    parser.add_argument("--bits", default="auto", help="weight widths to try, comma-separated: auto, 7, 8")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default: 2)")
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args()
    print("command: python3 " + shlex.join(sys.argv))
    print(f"CPU: {cpu_line()}; VNNI or AMX: {quantize.cpu_has_vnni()}")
    checkpoint = load_checkpoint(args.run)
    classes, positive, pre = checkpoint.classes, checkpoint.positive_index, checkpoint.preprocessing
    if positive is None:
        sys.exit("int8_check: a binary run is needed (AUC of the positive class)")
    split = quantize.read_split(args.run, checkpoint.split_sha256)
    paths, source = quantize.calibration_paths(split, None, quantize.CALIBRATION_IMAGES)
    calibration = quantize.decode_images(paths, pre, "calibration images")
    val = split["val"]
    val_images = quantize.decode_images([v["path"] for v in val], pre, "validation images")
    y_val = np.array([v["label"] for v in val])
    held_paths = [str(p) for p in expand_paths([args.held_out])]
    held_images = quantize.decode_images(held_paths, pre, "held-out images")
    y_held = np.array([classes.index(Path(p).parent.name) for p in held_paths])
    print(f"calibration: {source}; validation: {len(y_val)} images; held out: {len(y_held)} images "
          f"({int((y_held == positive).sum())} {classes[positive]})\n")

    folder = ensure_onnx(args.run)
    fp32 = OnnxPredictor(folder, threads=args.threads)
    models = [("fp32", fp32)]
    with tempfile.TemporaryDirectory(prefix="int8-check-") as scratch:  # ONNX Runtime holds each model once loaded
        for bits in args.bits.split(","):
            seven_bit = {"auto": not quantize.cpu_has_vnni(), "7": True, "8": False}.get(bits)
            if seven_bit is None:
                sys.exit(f"int8_check: --bits takes auto, 7 or 8, not {bits!r}")
            target = Path(scratch) / f"int8-{bits}.onnx"
            quantize.quantize_onnx(folder / "model.onnx", target, calibration, INPUT_NAME, seven_bit=seven_bit)
            models.append((f"int8, {7 if seven_bit else 8}-bit weights ({bits})",
                           OnnxPredictor(folder, threads=args.threads, model_file=target)))

    scored = {name: (quantize._probabilities(m, val_images), quantize._probabilities(m, held_images))
              for name, m in models}
    speed = {name: throughput(m, val_images) for name, m in models}
    print("| model | validation AUC | rank correlation within class (vs fp32) | held-out AUC | vs fp32 (95% CI), "
          "ahead in | held-out sensitivity | specificity | threshold | images/s, network alone |")
    print("|---|---|---|---|---|---|---|---|---|")
    p32_val, p32_held = scored["fp32"]
    for name, _ in models:
        p_val, p_held = scored[name]
        threshold = choose_threshold((y_val == positive).astype(int), p_val[:, positive], "youden")
        valid = compute_metrics(y_val, p_val, classes, threshold, "Youden's J on validation", positive)
        held = compute_metrics(y_held, p_held, classes, threshold, "Youden's J on validation", positive)
        ranks = quantize.rank_agreement(y_val, p32_val, p_val, classes)
        versus = "" if name == "fp32" else paired_auc_cell((y_held == positive).astype(int), p_held[:, positive],
                                                            p32_held[:, positive], args.boot)
        print(f"| {name} | {valid['auc']:.4f} | {', '.join(f'{k} {v:.3f}' for k, v in ranks.items())} | "
              f"{held['auc']:.4f} | {versus} | {held['sensitivity']:.4f} | {held['specificity']:.4f} | "
              f"{threshold:.3f} | {speed[name]:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What runs a frozen backbone fastest on this machine? Its engines side by side, model alone.

    python3 benchmarks/backbone_engines.py [--backbone tf_efficientnet_lite0] [--size 224] [--batch 32]
                                           [--seconds 8] [--rounds 2]

The network the default recipe extracts features with (random weights: speed does not depend
on them), on random uint8 pixels in memory (no files, decoding or start-up), each engine as
xferlearn sets it up:
- PyTorch eager, NCHW and channels_last; `FastForward` in fp32, without and with
  torch.compile (freezing) and, where the CPU computes bf16 natively, in bf16;
- ONNX Runtime through `OnnxForward` (the in-memory TorchScript-exported graph at one fixed
  batch shape, as training's features use it), and the same graph with its batch axis free.
The engines take turns, --rounds times, so a change in the machine's load reaches them all
alike; compare the rows of one run, not runs. Compile and export times are printed apart.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
import warnings

import numpy as np
import torch

from machine import describe  # benchmarks/machine.py

from xferlearn.models.base import cpu_supports_bf16, usable_cores
from xferlearn.models.features import PooledFeatures
from xferlearn.models.inference import FastForward
from xferlearn.models.onnx_forward import DEPTHWISE_SHARE_FOR_ONNX, OnnxForward, depthwise_share, feature_engine

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def free_axis_session(module, size: int, threads: int):
    """OnnxForward's graph with its batch axis left free (what it ran before it fixed the shape)."""
    import onnxruntime

    from xferlearn.models.inference import NormalizedInput

    wrapped = NormalizedInput(module, MEAN, STD, torch.float32).eval()
    buffer = io.BytesIO()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), buffer, dynamo=False, opset_version=17, input_names=["pixels"],
                          output_names=["out"], dynamic_axes={"pixels": {0: "batch"}, "out": {0: "batch"}})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["out"], {"pixels": x.numpy()})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="a timm model name")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default: 224)")
    parser.add_argument("--batch", type=int, default=32, help="images per call (default: 32, as training's)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per engine and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import timm

    torch.manual_seed(0)
    threads = usable_cores()
    model = PooledFeatures(timm.create_model(args.backbone, pretrained=False).eval())
    pixels = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    as_float = ((pixels.float() / 255 - 0.5) / 0.5)
    engines, setup = {}, {}

    def prepared(name, build):
        started = time.perf_counter()
        engines[name] = build()
        engines[name](pixels_for(name))  # the first call compiles or plans
        setup[name] = time.perf_counter() - started

    def pixels_for(name):
        return as_float.contiguous(memory_format=torch.channels_last) if "channels_last" in name else \
            as_float if name.startswith("PyTorch eager") else pixels

    with torch.inference_mode():
        prepared("PyTorch eager, NCHW fp32", lambda: model)
    cl = PooledFeatures(timm.create_model(args.backbone, pretrained=False).eval()).to(memory_format=torch.channels_last)
    cl.load_state_dict(model.state_dict())
    with torch.inference_mode():
        prepared("PyTorch eager, channels_last fp32", lambda: cl)
    normalize = (MEAN, STD)
    prepared("FastForward fp32", lambda: FastForward(model, "fp32", "cpu", "off", normalize=normalize))
    prepared("FastForward fp32, torch.compile (freezing)",
             lambda: FastForward(model, "fp32", "cpu", "on", batch_size=args.batch, normalize=normalize))
    if cpu_supports_bf16():
        prepared("FastForward bf16, torch.compile (freezing)",
                 lambda: FastForward(model, "bf16", "cpu", "on", batch_size=args.batch, normalize=normalize))
    prepared("ONNX Runtime, fixed batch shape (OnnxForward)",
             lambda: OnnxForward(model, MEAN, STD, args.size, threads, args.batch))
    prepared("ONNX Runtime, free batch axis", lambda: free_axis_session(model, args.size, threads))

    done = {name: [0, 0.0] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            x = pixels_for(name)
            with torch.inference_mode():
                started = time.perf_counter()
                while time.perf_counter() - started < args.seconds:
                    engine(x)
                    done[name][0] += args.batch
                done[name][1] += time.perf_counter() - started

    base = done["FastForward fp32"][0] / done["FastForward fp32"][1]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe()}; native bf16: {'yes' if cpu_supports_bf16() else 'no'}; {threads} threads; "
          f"torch {torch.__version__}")
    print(f"{args.backbone} at {args.size} px, batches of {args.batch}, random pixels, {args.rounds} rounds of "
          f"{args.seconds:g} s per engine, taking turns")
    share = depthwise_share(model, args.size)
    print(f"depthwise convolutions: {share:.3f} of the multiply-adds (ONNX Runtime's share from "
          f"{DEPTHWISE_SHARE_FOR_ONNX}); --feature-engine auto picks "
          f"{feature_engine('auto', torch.device('cpu'), 'auto', model, args.size)} here\n")
    print("| engine | images/s | x FastForward fp32 eager | set-up s (compile, export) |")
    print("|---|---|---|---|")
    for name, (images, seconds) in done.items():
        rate = images / seconds
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {setup[name]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

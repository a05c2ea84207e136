"""A frozen network run by ONNX Runtime: the fastest engine measured on a CPU.

ONNX Runtime's fp32 kernels for depthwise and 1x1 convolutions beat PyTorch's on the CPUs
measured here, in fp32 and even against its bf16 on a CPU that computes bf16 natively
(`feature_engine`): EfficientNet-Lite0 at 224 px, batches of 32, random pixels, 2 cores of an AVX2 EPYC
(benchmarks/RESULTS.md): PyTorch eager 28 images/s, torch.compile with freezing 49 (after a
23 s compile), ONNX Runtime 127. `OnnxForward` exports the module once, in memory (uint8
pixels in, the one normalisation inside the graph, as `FastForward` does), checks its
outputs against PyTorch's on a batch of random pixels, and runs it with ONNX Runtime at one
fixed batch size, padding a short last batch: with the batch axis left free, ONNX Runtime
ran the same graph at 80 images/s instead of 120-134.
`feature_engine` says which engine `auto` stands for on a given device and precision.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch

from .base import run_fixed
from .inference import NormalizedInput

log = logging.getLogger(__name__)

# Largest accepted difference from PyTorch, relative to the largest output of the check batch:
# the two engines sum in different orders, so fp32 rounding differs by about 1e-6 of the scale.
RELATIVE_TOLERANCE = 1e-3
_PROTOBUF_LIMIT = 1.8e9  # an in-memory ONNX model stops at 2 GB; larger networks stay on PyTorch


class OnnxUnavailable(RuntimeError):
    """This network could not be run by ONNX Runtime here (export failed, too large, or it disagreed)."""


def feature_engine(engine: str, device: torch.device, precision: str) -> str:
    """The engine 'auto' stands for: ONNX Runtime on a CPU unless bf16 was asked for by name,
    PyTorch on a GPU. Even where a CPU computes bf16 natively, ONNX Runtime's fp32 was the
    faster: 160 images/s end to end against PyTorch's compiled bf16 109, predicting with
    EfficientNet-Lite0 on 2 cores of a Xeon with AVX-512 BF16 and AMX (README, speed table)."""
    if engine != "auto":
        return engine
    return "onnx" if device.type == "cpu" and precision in ("auto", "fp32") else "torch"


class OnnxForward:
    """`module` (a frozen network taking a normalised float NCHW batch) exported to ONNX and run
    by ONNX Runtime on `threads` threads; called with uint8 pixels like `FastForward`.
    Raises OnnxUnavailable where that cannot be done faithfully; the caller keeps PyTorch."""

    def __init__(self, module: torch.nn.Module, mean, std, input_size: int, threads: int, batch_size: int = 32):
        import onnxruntime

        weights = next(module.parameters(), None)
        if weights is not None and (weights.device.type != "cpu" or weights.dtype is not torch.float32):
            raise OnnxUnavailable(f"ONNX Runtime runs fp32 networks on the CPU, not {weights.dtype} on {weights.device}")
        module = NormalizedInput(module.eval(), mean, std, torch.float32).eval()
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        if size > _PROTOBUF_LIMIT:
            raise OnnxUnavailable(f"{size / 1e9:.1f} GB of weights is over ONNX's in-memory limit")
        generator = torch.Generator().manual_seed(0)
        example = torch.randint(0, 256, (2, 3, input_size, input_size), dtype=torch.uint8, generator=generator)
        check = torch.randint(0, 256, (3, 3, input_size, input_size), dtype=torch.uint8, generator=generator)
        buffer = io.BytesIO()
        try:
            # The TorchScript-based exporter: about 10x quicker than the torch.export-based one
            # for these networks, and this graph lives only as long as the run. Autocast off: a
            # fine-tune's validation exports from inside Lightning's bf16-mixed context, which
            # would otherwise trace bf16 casts into an fp32 graph that ONNX Runtime refuses.
            with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", enabled=False):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17,
                                  input_names=["pixels"], output_names=["out"],
                                  dynamic_axes={"pixels": {0: "batch"}, "out": {0: "batch"}})  # fixed below
        except Exception as error:  # noqa: BLE001 - any exporter failure means: stay on PyTorch
            raise OnnxUnavailable(f"the ONNX export failed: {str(error).strip().splitlines()[0][:200]}") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        # No spin-waiting: the loader process decoding the next batch needs those cycles.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_free_dimension_override_by_name("batch", batch_size)
        self.batch_size = batch_size
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            expected = module(check).numpy()
        got = self._run(check.numpy())
        difference = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max()) or 1.0
        if not difference <= RELATIVE_TOLERANCE * scale:
            raise OnnxUnavailable(f"ONNX Runtime disagreed with PyTorch by {difference:.2e} (outputs up to {scale:.2e})")
        log.info("ONNX Runtime on %d threads (largest difference from PyTorch %.1e)", threads, difference)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        return run_fixed(self.session, "pixels", "out", pixels, self.batch_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 pixels -> the module's output, float32 on the CPU."""
        return torch.from_numpy(self._run(x.numpy()))


def onnx_or_none(module: torch.nn.Module, mean, std, input_size: int, threads: int, batch_size: int,
                 say, instead: str) -> OnnxForward | None:
    """`OnnxForward` of `module`, or None after `say`ing "`instead` instead of ONNX Runtime: why"
    where it cannot be had; every caller then keeps PyTorch."""
    try:
        return OnnxForward(module, mean, std, input_size, threads, batch_size)
    except OnnxUnavailable as reason:
        say(f"{instead} instead of ONNX Runtime: {reason}")
        return None

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
`feature_engine` says which engine `auto` stands for on a given device, precision and network.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch

from .base import cpu_supports_bf16, run_fixed
from .inference import NormalizedInput

log = logging.getLogger(__name__)

# Largest accepted difference from PyTorch, relative to the largest output of the check batch:
# the two engines sum in different orders, so fp32 rounding differs by about 1e-6 of the scale.
RELATIVE_TOLERANCE = 1e-3
_PROTOBUF_LIMIT = 1.8e9  # an in-memory ONNX model stops at 2 GB; larger networks stay on PyTorch


class OnnxUnavailable(RuntimeError):
    """This network could not be run by ONNX Runtime here (export failed, too large, or it disagreed)."""


# A network with less than this share of its multiply-adds in depthwise convolutions is built of
# dense ones, and there PyTorch's compiled bf16 beat ONNX Runtime's fp32 wherever the CPU computes
# bf16 natively; above it (inverted residuals: MobileNet, EfficientNet) ONNX Runtime won.
# `benchmarks/backbone_engines.py`, 2 AVX-512 BF16 cores, compiled bf16 / ONNX Runtime images/s:
# VGG16 1.64, ResNet-50 1.35, ResNet-18 1.57, Inception v3 1.54, Xception 1.25, DenseNet-121
# 1.17, ConvNeXt-T 2.03 (depthwise shares 0 to 0.024); MobileNetV2 0.72, EfficientNet-Lite2 at
# 320 px 0.63, Lite0 0.56 (shares 0.069 to 0.091). benchmarks/RESULTS.md, session 19.
DEPTHWISE_SHARE_FOR_ONNX = 0.05


def depthwise_share(network: torch.nn.Module, input_size: int) -> float:
    """The share of `network`'s convolution and linear multiply-adds, for one image of
    `input_size` px, done in depthwise convolutions (one filter per channel). Counted on one
    forward pass in eval mode, its training flags restored after (BatchNorm statistics untouched)."""
    counts = {"depthwise": 0, "all": 0}

    def count(module, inputs, output):
        macs = output.numel() * module.weight[0].numel()  # per output value: in/groups x kh x kw, or in_features
        counts["all"] += macs
        if isinstance(module, torch.nn.Conv2d) and 1 < module.groups == module.in_channels:
            counts["depthwise"] += macs

    layers = [m for m in network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    modes = {module: module.training for module in network.modules()}
    weights = next(network.parameters())
    try:
        network.eval()
        with torch.no_grad(), torch.autocast(weights.device.type, enabled=False):
            network(torch.zeros(1, 3, input_size, input_size, dtype=weights.dtype, device=weights.device))
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return counts["depthwise"] / max(counts["all"], 1)


def feature_engine(engine: str, device: torch.device, precision: str, network: torch.nn.Module | None = None,
                   input_size: int = 224) -> str:
    """The engine 'auto' stands for: PyTorch on a GPU, or where bf16 was asked for by name;
    on a CPU, ONNX Runtime (fp32), except for a `network` of dense convolutions where the CPU
    computes bf16 natively and `precision` is auto (DEPTHWISE_SHARE_FOR_ONNX). Callers pass the
    network only for images that train and are never scored (the linear recipe's training views):
    scores that choose an epoch or a threshold come from the engine `predict` runs. Even on such a
    CPU ONNX Runtime's fp32 was the faster for EfficientNet-Lite0: 160 images/s end to end
    against PyTorch's compiled bf16 109, predicting on 2 cores of a Xeon with AMX (README)."""
    if engine != "auto":
        return engine
    if device.type != "cpu" or precision not in ("auto", "fp32"):
        return "torch"
    dense = network is not None and precision == "auto" and cpu_supports_bf16() and \
        depthwise_share(network, input_size) < DEPTHWISE_SHARE_FOR_ONNX
    return "torch" if dense else "onnx"


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

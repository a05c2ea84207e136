"""Fast inference for a frozen network: the kernels that pay on this hardware, and only those.

Feature extraction and prediction both run a fixed network over many images. `FastForward`
prepares such a network once:
- channels_last memory layout (oneDNN's and cuDNN's preferred convolution layout);
- bf16 weights and activations where the hardware computes bf16 natively (AVX-512 BF16 or
  AMX on a CPU, a bf16-capable GPU), detected rather than assumed; fp32 elsewhere;
- `torch.compile` with weight freezing (BatchNorm folded into convolutions, fused
  elementwise ops) when enough images are coming to repay its compile time.
Batches are padded to one fixed size, so the compiled graph is built once and never again
for a short last batch. benchmarks/speed.py measures each of these against fp32 eager and
checks that AUC moves by less than 0.002.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import nullcontext

import torch

from .base import cpu_supports_bf16

log = logging.getLogger(__name__)

# Below this many images the compile time (about 20-40 s for EfficientNet-Lite0 on 2 cores)
# is not repaid; above it, compiled bf16 runs about 1.6x faster than bf16 eager here.
COMPILE_MIN_IMAGES = 3000


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware computes it natively, else 'fp32'."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def import_compiler_quietly() -> None:
    """Inductor imports torch.utils.cpp_extension on the first compiled call, and on a machine
    with a CUDA toolkit but no GPU that import logs "No CUDA runtime is found" (once, at
    import): nothing a user acts on. Imported here with that one logger raised to ERROR for
    the import alone, so the message never reaches the user and the logger is left as it was."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def should_compile(compile: str | bool, n_images: int | None, device: torch.device | None = None) -> bool:
    """auto: on a CPU where enough images repay the compile; never on a GPU, where the eager
    network already outruns everything around it: on an H200, Lite0 in bf16 ran 6,300 images/s
    eager in batches of 32 (benchmarks/gpu.py) while a compiled `predict` of 5,216 images took
    26 s end to end (200 images/s, a compile-cache hit; inductor's import alone is seconds on a
    fresh machine). benchmarks/RESULTS.md, session 5; not re-timed without compiling there."""
    if isinstance(compile, bool):
        return compile
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, not {compile!r}")
    if compile == "auto":
        # XFERLEARN_COMPILE=off lets tests and constrained machines skip compilation entirely.
        if os.environ.get("XFERLEARN_COMPILE", "auto") == "off":
            return False
        on_gpu = device is not None and device.type == "cuda"
        return not on_gpu and n_images is not None and n_images >= COMPILE_MIN_IMAGES
    return compile == "on"


def pixel_scale(mean, std, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights' mean and std (0..1 scale) as (1, 3, 1, 1) fp32 tensors on the 0..255 scale."""
    as_pixels = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0  # noqa: E731
    return as_pixels(mean), as_pixels(std)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 (x - mean) / std: the one normalisation of training,
    evaluation, prediction, Grad-CAM and export (`NormalizedInput` bakes it into a graph)."""
    if not isinstance(mean, torch.Tensor):
        mean, std = pixel_scale(mean, std, pixels.device)
    return (pixels.float() - mean) / std


class NormalizedInput(torch.nn.Module):
    """uint8 pixels -> normalize() in fp32 -> `dtype` -> `module`: one fused pass when compiled."""

    def __init__(self, module: torch.nn.Module, mean, std, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype
        pixel_mean, pixel_std = pixel_scale(mean, std)
        self.register_buffer("mean", pixel_mean)
        self.register_buffer("std", pixel_std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(normalize(pixels, self.mean, self.std).to(self.dtype))


class FastForward:
    """`module` (a frozen network taking a normalised float NCHW batch) made fast for inference.
    With `normalize` (mean, std on the 0..1 scale) it takes uint8 pixels and normalises them
    itself, inside the compiled graph where there is one."""

    def __init__(self, module: torch.nn.Module, precision: str = "auto", device: torch.device | str | None = None,
                 compile: str | bool = "off", n_images: int | None = None, batch_size: int = 32,
                 normalize: tuple | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.precision = resolve_precision(precision, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.batch_size = batch_size
        module = module.eval().to(self.device, memory_format=torch.channels_last)
        if self.dtype is torch.bfloat16 and self.device.type == "cpu":
            # Whole-bf16 weights beat autocast on CPU (no per-call cast of every weight). A copy:
            # the caller's fp32 model stays as it was (Grad-CAM and export use it, a head trains on it).
            module = copy.deepcopy(module).to(torch.bfloat16)
        self.takes_pixels = normalize is not None
        if self.takes_pixels:
            module = NormalizedInput(module, *normalize, self.input_dtype()).to(self.device)
        self.compiled = should_compile(compile, n_images, self.device)
        if self.compiled:
            import_compiler_quietly()
            # Freezing folds BatchNorm and constants into the kernels; passed per compile, not set
            # process-wide in inductor's config (which would change every other compile too).
            module = torch.compile(module, dynamic=False, options={"freezing": True})
            log.info("torch.compile with freezing (first batch compiles)")
        self.module = module

    def input_dtype(self) -> torch.dtype:
        # bf16 weights on a CPU take bf16 input; on a GPU the weights stay fp32 under autocast.
        return self.dtype if self.device.type == "cpu" else torch.float32

    def autocast(self):
        # On a GPU autocast keeps the reductions that need it in fp32; on a CPU the weights are bf16 already.
        if self.dtype is torch.bfloat16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised float (uint8 pixels with `normalize`) -> the module's output as
        float32 on the CPU."""
        n = len(x)
        if self.compiled and n < self.batch_size:
            # One fixed shape: a short last batch is padded rather than compiled again.
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        x = x.to(self.device, torch.uint8 if self.takes_pixels else self.input_dtype())
        x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.module(x)
        return out[:n].float().cpu()

"""The frozen lower layers of a partly unfrozen network, run by ONNX Runtime while the rest trains.

A fine-tune stage trains the top layer groups and freezes the ones below, in eval mode
(training/finetune.py). Those compute a fixed function of the pixels: needed at every step,
since every step draws fresh augmented views (so it cannot be cached), but never
differentiated. PyTorch's eager CPU kernels are slow for them (EfficientNet-Lite0, 2 AVX2
cores: 28 images/s against ONNX Runtime's 127, onnx_forward.py), and they held a fine-tune
stage to about 21 training images/s. So on a CPU the frozen prefix runs through ONNX Runtime
and only the layers that train run in PyTorch, under autograd.

The gradients are the whole network's: no parameter below the split trains, and none of
the pixels needs a gradient, so autograd never went below the split anyway. Only the
rounding differs (ONNX Runtime sums in another order; Lite0's logits within about 1e-4).

Split here: networks whose `forward_features` is a plain sequence of modules, timm's
EfficientNet (EfficientNet, EfficientNet-Lite, MobileNetV2, MixNet...), ResNet and VGG.
Any other network trains wholly in PyTorch (`frozen_prefix` returns None). Used with `--frozen-engine onnx`,
not by default: see training/finetune.py and benchmarks/RESULTS.md, session 14.
"""

from __future__ import annotations

import torch

from .onnx_forward import OnnxForward


def sequence(net: torch.nn.Module) -> list[torch.nn.Module] | None:
    """`net.forward_features` as a list of modules applied one after another (the stem as one,
    each residual block as one), for the families named above; None for any other network."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vgg import VGG

    if isinstance(net, EfficientNet):
        return [torch.nn.Sequential(net.conv_stem, net.bn1), *[block for stage in net.blocks for block in stage],
                torch.nn.Sequential(net.conv_head, net.bn2)]
    if isinstance(net, ResNet):
        layers = (net.layer1, net.layer2, net.layer3, net.layer4)
        return [torch.nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool),
                *[block for layer in layers for block in layer]]
    if isinstance(net, VGG):
        return list(net.features)
    return None


def frozen_length(units: list[torch.nn.Module]) -> int:
    """How many leading units have no trainable parameter."""
    for index, unit in enumerate(units):
        if any(param.requires_grad for param in unit.parameters()):
            return index
    return len(units)


class FrozenPrefix:
    """`net` (uint8 pixels in, logits out, as FinetuneModule.forward) with its leading `count`
    units on ONNX Runtime and the rest, then `forward_head`, in PyTorch. Export the prefix
    again whenever its weights may have changed (a new stage, a loaded checkpoint)."""

    def __init__(self, net: torch.nn.Module, units: list[torch.nn.Module], count: int, mean, std,
                 input_size: int, threads: int, batch_size: int):
        self.net, self.count, self.rest = net, count, units[count:]
        self.total = len(units)
        self.engine = OnnxForward(torch.nn.Sequential(*units[:count]), mean, std, input_size, threads, batch_size)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.engine(pixels.cpu()).contiguous(memory_format=torch.channels_last)
        for unit in self.rest:
            x = unit(x)
        return self.net.forward_head(x)

    def describe(self) -> str:
        return (f"the {self.count} frozen blocks of {self.total} (stem first) run on ONNX Runtime, "
                f"the {self.total - self.count} above them and the head in PyTorch")


def frozen_prefix(net: torch.nn.Module, mean, std, input_size: int, threads: int,
                  batch_size: int) -> FrozenPrefix | None:
    """A FrozenPrefix of `net` as its parameters are frozen now; None where nothing leading is
    frozen or the network is not one that splits. Raises OnnxUnavailable if the export fails."""
    units = sequence(net)
    if units is None:
        return None
    count = frozen_length(units)
    if count == 0:
        return None
    return FrozenPrefix(net, units, count, mean, std, input_size, threads, batch_size)

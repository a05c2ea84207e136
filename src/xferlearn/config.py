"""The training configuration: one typed, validated dataclass, saved into every run.

The resolved configuration is written beside the checkpoint (config.json), so a run can
be rebuilt from its folder alone; the CLI's flags map one to one onto these fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .augment import PRESETS
from .errors import XferlearnError

RECIPES = ("linear", "finetune")
IMBALANCE = ("none", "weights", "sampler")
THRESHOLDS = ("youden", "target_sensitivity")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/xferlearn"
    backbone: str = "efficientnet_lite0"
    weights: str = "default"          # default | packaged | imagenet | none | a path to a state dict
    recipe: str = "linear"            # linear: frozen base + new head (the article's); finetune: staged
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    views: int = 2                    # augmented views per training image, beside the clean one
    augment: str = "article"          # an augment.py preset
    val_fraction: float = 0.2
    imbalance: str = "weights"        # none | weights (class-weighted loss) | sampler (balanced batches)
    threshold: str = "youden"         # how the decision threshold is picked on validation
    target_sensitivity: float | None = None
    image_size: int | None = None     # None: the weights' own input size
    precision: str = "auto"           # auto: bf16 where the hardware computes it natively
    seed: int = 0
    workers: int | None = None        # DataLoader workers; None: chosen from the core count
    batch_size_features: int = 64
    cache_dir: str | None = None      # None: $XFERLEARN_CACHE or ~/.cache/xferlearn
    resume: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise XferlearnError(message)

        need(self.recipe in RECIPES, f"--recipe must be one of {RECIPES}, not {self.recipe!r}.")
        need(self.augment in PRESETS, f"--augment must be one of {PRESETS}, not {self.augment!r}.")
        need(self.imbalance in IMBALANCE, f"--imbalance must be one of {IMBALANCE}, not {self.imbalance!r}.")
        need(self.threshold in THRESHOLDS, f"--threshold must be one of {THRESHOLDS}, not {self.threshold!r}.")
        need(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, not {self.precision!r}.")
        need(self.epochs >= 1, "--epochs must be at least 1.")
        need(self.batch_size >= 1 and self.batch_size_features >= 1, "batch sizes must be at least 1.")
        need(self.lr > 0, "--lr must be positive.")
        need(self.weight_decay >= 0, "--weight-decay must not be negative.")
        need(self.views >= 0, "--views must be 0 or more.")
        need(0.05 <= self.val_fraction <= 0.5, "--val-fraction must be between 0.05 and 0.5.")
        need(self.image_size is None or 32 <= self.image_size <= 1024, "--image-size must be between 32 and 1024.")
        need(self.workers is None or self.workers >= 0, "--workers must be 0 or more.")
        if self.target_sensitivity is not None:
            need(0 < self.target_sensitivity < 1, "--target-sensitivity must be between 0 and 1.")
            self.threshold = "target_sensitivity"
        need(self.threshold != "target_sensitivity" or self.target_sensitivity is not None,
             "--threshold target_sensitivity needs --target-sensitivity, e.g. 0.97.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, path: Path) -> None:
        from .images import atomic_write_bytes
        atomic_write_bytes(Path(path), json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

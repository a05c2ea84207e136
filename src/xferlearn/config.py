"""The training configuration: one typed, validated dataclass, saved into every run.

The resolved configuration is written beside the checkpoint (config.json), so a run can
be rebuilt from its folder alone; the CLI's flags map one to one onto these fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ._io import write_json
from .errors import XferlearnError

RECIPES = ("linear", "finetune")
IMBALANCE = ("none", "weights", "sampler")
THRESHOLDS = ("youden", "target_sensitivity")
PRECISIONS = ("auto", "bf16", "fp32")
BN_POLICIES = ("frozen", "last_stage")
COMPILE_MODES = ("auto", "on", "off")
AUGMENT_PRESETS = ("article", "xray", "none")  # defined in data/augment.py (train_transform)
# Choices of the other commands, named here (the one light module the CLI imports) so that
# `--help`, the checks and the code that acts on them share one definition.
ENGINES = ("torch", "onnx", "onnx-int8")
EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")  # onnx-int8 is derived from onnx (deploy/quantize.py)
# The stress test's acquisition-like shifts (defined in evaluation/corruptions.py) and where its images come from.
STRESS_SHIFTS = ("gamma", "contrast", "blur", "noise", "jpeg", "lowres", "rotate", "zoom", "border", "text")
STRESS_SPLITS = ("val",)
# The augmentation each recipe uses unless --augment says otherwise (benchmarks/RESULTS.md has
# the validation comparison behind the finetune choice).
DEFAULT_AUGMENT = {"linear": "article", "finetune": "xray"}


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/xferlearn"
    backbone: str = "efficientnet_lite0"
    weights: str = "default"          # default | packaged | imagenet | none | a path to a state dict
    recipe: str = "linear"            # linear: frozen base + new head (the article's); finetune: staged
    epochs: int = 30                  # of the head on cached features (finetune: its stage 0)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    views: int = 1                    # augmented views per training image, beside the clean one
    augment: str | None = None        # an augment.py preset; None: the recipe's (DEFAULT_AUGMENT)
    val_fraction: float = 0.2
    imbalance: str = "weights"        # none | weights (class-weighted loss) | sampler (balanced batches)
    threshold: str = "youden"         # how the decision threshold is picked on validation
    target_sensitivity: float | None = None
    image_size: int | None = None     # None: the weights' own input size
    precision: str = "auto"           # auto: bf16 where the hardware computes it natively
    compile: str = "auto"             # torch.compile the frozen backbone: auto = when enough images repay it
    seed: int = 0
    workers: int | None = None        # DataLoader workers; None: chosen from the core count
    batch_size_features: int = 32     # images per frozen-backbone call: 32 ran 1.2-1.35x faster than 64 on 2 cores
    cache_dir: str | None = None      # None: $XFERLEARN_CACHE or ~/.cache/xferlearn
    resume: bool = False
    tta: bool = False                 # choose the threshold on test-time-augmented probabilities, and predict so
    # --recipe finetune: after the head (stage 0), the network is unfrozen in stages (finetune.py).
    stages: str = "4,9"               # per stage, how many layer groups below the head train; "all": every one
    finetune_epochs: int = 3          # most epochs per stage (early stopping may end a stage sooner)
    finetune_batch_size: int = 32
    lr_backbone: float = 3e-4         # peak rate of the top layers (one-cycle: warm-up, then cosine)
    layer_decay: float = 0.7          # each layer group further down trains at layer_decay x the rate above it
    bn_policy: str = "frozen"         # frozen: BatchNorm statistics never change; last_stage: they update there
    ema: float = 0.0                  # decay of an exponential moving average of the weights; 0: none
    patience: int = 2                 # epochs without a better validation AUC before a stage stops

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise XferlearnError(message)

        need(self.recipe in RECIPES, f"--recipe must be one of {RECIPES}, not {self.recipe!r}.")
        if self.augment is None:
            self.augment = DEFAULT_AUGMENT[self.recipe]
        need(self.augment in AUGMENT_PRESETS, f"--augment must be one of {AUGMENT_PRESETS}, not {self.augment!r}.")
        need(self.imbalance in IMBALANCE, f"--imbalance must be one of {IMBALANCE}, not {self.imbalance!r}.")
        need(self.threshold in THRESHOLDS, f"--threshold must be one of {THRESHOLDS}, not {self.threshold!r}.")
        need(self.compile in COMPILE_MODES, f"--compile must be one of {COMPILE_MODES}, not {self.compile!r}.")
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
        self.stage_depths()  # raises on a malformed --stages
        need(self.finetune_epochs >= 1, "--finetune-epochs must be at least 1.")
        need(self.finetune_batch_size >= 2, "--finetune-batch-size must be at least 2.")
        need(self.lr_backbone > 0, "--lr-backbone must be positive.")
        need(0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]: 1 trains every layer at the same rate.")
        need(self.bn_policy in BN_POLICIES, f"--bn-policy must be one of {BN_POLICIES}, not {self.bn_policy!r}.")
        need(0 <= self.ema < 1, "--ema is a decay in [0, 1), e.g. 0.998; 0 turns the average off.")
        need(self.patience >= 1, "--patience must be at least 1.")

    def stage_depths(self) -> list[int | None]:
        """--stages as numbers of layer groups below the head, one per stage; None: all of them."""
        depths: list[int | None] = []
        for item in str(self.stages).replace(" ", "").split(","):
            if item == "all":
                depths.append(None)
            elif item.isdigit() and int(item) >= 1:
                depths.append(int(item))
            else:
                raise XferlearnError(f"--stages takes comma-separated counts of layer groups (at least 1) or 'all', "
                                     f"e.g. 4,9,all; not {self.stages!r}.")
        counts = [float("inf") if d is None else d for d in depths]
        if counts != sorted(set(counts)):
            raise XferlearnError(f"--stages must unfreeze more layers at each stage, e.g. 4,9,all; not {self.stages!r}.")
        return depths

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

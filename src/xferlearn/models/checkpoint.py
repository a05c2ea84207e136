"""The self-describing checkpoint: everything predict, explain, export and serve need.

One file, `model.pt` in the run folder, holds the architecture, the weights' origin, the
preprocessing, the class names, the decision threshold and where it came from, the
temperature, the config, the validation metrics, the library versions and the state
dict. It holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: opening a checkpoint never runs code from it. It is
written atomically, so a crash or a full disk leaves the previous one whole.
"""

from __future__ import annotations

import io
import math
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .._io import atomic_write, plain
from ..config import POOLS
from ..data.images import Preprocessing
from ..errors import XferlearnError
from ..rundir import checkpoint_path

FORMAT = "xferlearn-checkpoint"
FORMAT_VERSION = 2  # 2: typed operating point and preprocessing (version 1 is read and converted)
# Sanity bounds checked before anything is allocated from a checkpoint's fields.
MAX_INPUT_SIZE = 2048
MAX_CLASSES = 100_000
MAX_PARAMETERS = 2_000_000_000  # numbers in the weights: far above any timm classifier people fine-tune on a CPU


def library_versions() -> dict[str, str]:
    import timm

    from .. import __version__
    return {"xferlearn": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


THRESHOLD_RULES = {"youden": "Youden's J (max sensitivity + specificity - 1)",
                   "target_sensitivity": "the highest threshold with sensitivity >= {target}",
                   "argmax": "argmax (multi-class)"}


@dataclass(frozen=True)
class OperatingPoint:
    """How a model decides, and where that was chosen: kept as fields, rendered to text only
    for people (`describe`). `value` is None for argmax (multi-class)."""

    method: str                     # youden | target_sensitivity | argmax
    value: float | None = None      # the threshold on the positive class's probability
    data: str = "validation split"  # what it was chosen on
    n: int = 0                      # how many images that was
    when: str = "training"          # training | export (int8) | calibrate (a site sample)
    engine: str = "torch"           # the model whose probabilities it was chosen on
    target: float | None = None     # the sensitivity target of target_sensitivity
    tta_views: int = 0              # >0: on probabilities averaged over this many TTA views
    interval: tuple[float, float] | None = None  # bootstrap 95% interval of the threshold, where measured
    note: str = ""                  # free text kept from an older checkpoint

    def describe(self) -> str:
        if self.note:
            return self.note
        rule = THRESHOLD_RULES.get(self.method, self.method).format(target=self.target)
        if self.method == "argmax":
            return rule
        text = f"{rule} on the {self.data} ({self.n} images) at {self.when} time"
        if self.engine != "torch":
            text += f", through the {self.engine} model"
        if self.tta_views:
            text += f", on probabilities averaged over {self.tta_views} test-time-augmentation views"
        return text

    def to_dict(self) -> dict:
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, record: dict) -> "OperatingPoint":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        if values.get("interval") is not None:
            values["interval"] = tuple(values["interval"])
        return cls(**values)


@dataclass
class Checkpoint:
    arch: str                       # timm architecture
    backbone: str                   # the name the user asked for
    weights: str                    # where the pretrained weights came from (tag)
    preprocessing: Preprocessing
    classes: list[str]
    positive_index: int | None      # binary: the class the threshold applies to; None for multi-class
    operating_point: OperatingPoint
    state_dict: dict
    temperature: float = 1.0
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tta: bool = False                # the threshold was chosen on test-time-augmented probabilities
    class_prior: list[float] | None = None  # the class prior the probabilities refer to (for --prevalence)
    image_size: int | None = None   # the --image-size the network was built for (None: its default)
    pool: str | None = None          # the global pooling it was built with (backbones.with_pool; None: its own)
    split_sha256: str | None = None  # hash of the run's split.json at training time (int8 export checks it)
    versions: dict = field(default_factory=library_versions)

    @property
    def positive_class(self) -> str | None:
        return None if self.positive_index is None else self.classes[self.positive_index]

    @property
    def threshold(self) -> float | None:
        return self.operating_point.value

    @property
    def threshold_source(self) -> str:
        return self.operating_point.describe()

    def build_model(self) -> torch.nn.Module:
        """The trained network, rebuilt from the architecture name and the stored weights alone."""
        from .backbones import create_empty

        model = create_empty(self.arch, len(self.classes), image_size=self.image_size, pool=self.pool)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0][:160]
            raise XferlearnError(f"the checkpoint's weights do not fit a {self.arch} with {len(self.classes)} "
                                 f"classes ({reason}); was it edited by hand?") from None
        return model.eval()

    def card(self) -> dict:
        """Everything but the weights: what a model card or a sidecar file shows."""
        record = self.record()
        record.pop("state_dict")
        record["positive_class"] = self.positive_class
        record["threshold"], record["threshold_source"] = self.threshold, self.threshold_source
        return record

    def record(self) -> dict:
        """The checkpoint as plain values (tensors kept as they are)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state_dict"}
        values["preprocessing"] = self.preprocessing.to_dict()
        values["operating_point"] = self.operating_point.to_dict()
        return plain(values) | {"state_dict": self.state_dict}


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    record = checkpoint.record()
    record["format"], record["format_version"] = FORMAT, FORMAT_VERSION
    record["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in checkpoint.state_dict.items()}
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return atomic_write(path, buffer.getvalue())


def _upgrade(record: dict) -> dict:
    """A format-1 checkpoint (threshold and its source as text, preprocessing as a dict)."""
    if "operating_point" not in record:
        threshold = record.pop("threshold", None)
        note = str(record.pop("threshold_source", "") or "")
        record["operating_point"] = {"method": "argmax" if threshold is None else "recorded", "value": threshold,
                                     "note": note}
    return record


def _checked(record: dict, path: Path) -> Checkpoint:
    """Every field checked for type and sanity before a model is built from it."""
    def need(ok: bool, what: str):
        if not ok:
            raise XferlearnError(f"{path} is damaged or edited by hand: {what}.")

    for name in ("arch", "backbone", "weights", "classes", "preprocessing", "operating_point", "state_dict"):
        need(name in record, f"it has no '{name}' field")
    classes = record["classes"]
    need(isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes),
         f"'classes' must be a list of 2 to {MAX_CLASSES} names")
    positive = record.get("positive_index")
    need(positive is None or (isinstance(positive, int) and 0 <= positive < len(classes) == 2),
         "'positive_index' must be 0 or 1 for two classes, or None")
    need(isinstance(record["state_dict"], dict) and all(isinstance(v, torch.Tensor)
                                                        for v in record["state_dict"].values()),
         "'state_dict' must map names to tensors")
    need(all(isinstance(record[name], str) and 0 < len(record[name]) <= 1000  # an ensemble joins its members'
             for name in ("arch", "backbone", "weights")),
         "'arch', 'backbone' and 'weights' must be short strings")
    need(len(set(classes)) == len(classes) and all(0 < len(c) <= 200 for c in classes),
         "class names must be distinct and 1 to 200 characters")
    need(sum(v.numel() for v in record["state_dict"].values()) <= MAX_PARAMETERS,
         f"the weights hold more than {MAX_PARAMETERS:,} numbers")
    pre = record["preprocessing"]
    need(isinstance(pre, dict) and isinstance(pre.get("input_size"), int)
         and 16 <= pre["input_size"] <= MAX_INPUT_SIZE, f"the input size must be 16 to {MAX_INPUT_SIZE} pixels")
    need(all(isinstance(pre.get(k), list) and len(pre[k]) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                      for v in pre[k]) for k in ("mean", "std")),
         "preprocessing 'mean' and 'std' must be 3 finite numbers each")
    for name in ("config", "metrics", "versions"):
        need(isinstance(record.get(name, {}), dict), f"'{name}' must be a mapping")
    prior = record.get("class_prior")
    need(prior is None or (isinstance(prior, list) and len(prior) == len(classes)
                           and all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in prior)),
         "'class_prior' must be one share in [0, 1] per class")
    need(isinstance(record.get("tta", False), bool), "'tta' must be true or false")
    need(record.get("split_sha256") is None or isinstance(record["split_sha256"], str), "'split_sha256' must be text")
    built = [pool for pool in POOLS if pool != "auto"]  # what a network can be built with
    need(record.get("pool") in (None, *built), f"'pool' must be one of {', '.join(built)}")
    size = record.get("image_size")
    need(size is None or (isinstance(size, int) and 16 <= size <= MAX_INPUT_SIZE),
         f"'image_size' must be 16 to {MAX_INPUT_SIZE} pixels")
    temperature = record.get("temperature", 1.0)
    need(isinstance(temperature, (int, float)) and 0 < temperature < 1e3, "'temperature' must be positive")
    point = record["operating_point"]
    need(isinstance(point, dict) and isinstance(point.get("method"), str), "'operating_point' is malformed")
    value = point.get("value")
    need(value is None or (isinstance(value, (int, float)) and 0 <= value <= 1), "the threshold must be in [0, 1]")
    known = {f.name for f in fields(Checkpoint)}
    values = {k: v for k, v in record.items() if k in known}
    values["preprocessing"] = Preprocessing.from_dict(pre)
    try:
        values["operating_point"] = OperatingPoint.from_dict(point)
        return Checkpoint(**values)
    except TypeError as error:
        raise XferlearnError(f"{path} is damaged or edited by hand: {error}.") from None


def load_checkpoint(run: str | Path) -> Checkpoint:
    """Load a run folder's checkpoint (or a checkpoint file), refusing anything that is not ours."""
    path = checkpoint_path(run)
    if not path.exists():
        raise XferlearnError(f"No checkpoint at {path}: pass a run folder made by `xferlearn train`.")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code, zip damage, text files: all mean "not ours"
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise XferlearnError(f"{path} is not an xferlearn checkpoint (it cannot be loaded safely: {reason}).") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise XferlearnError(f"{path} is not an xferlearn checkpoint (no '{FORMAT}' marker); "
                             "train one with `xferlearn train`.")
    version = record.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise XferlearnError(f"{path} was written by a newer xferlearn (format {version}); upgrade xferlearn.")
    record.pop("format"), record.pop("format_version")
    return _checked(_upgrade(record), path)

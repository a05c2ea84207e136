"""Grad-CAM explanations: where in an X-ray the network found the evidence for its call.

`explain(predictor, item)` decodes the image exactly as prediction does, makes the same
call (the validation threshold on the positive class), and asks Grad-CAM
(`pytorch_grad_cam`, not rewritten here) which regions of the last convolutional feature
map pushed the network towards that call. `explanation_png` draws the image beside its
heatmap with the call as a caption; `explain_files` does that for files and folders, and
`error_gallery` adds the most confident mistakes to an evaluation report.

Grad-CAM needs gradients, so the forward pass runs outside inference mode. It adds hooks
to the predictor's model for the duration of one call: do not run other forward passes
on the same predictor at that moment (`xferlearn serve` holds a lock around it).
"""

from __future__ import annotations

import io
import logging
import textwrap
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from .._io import atomic_write
from ..data.augment import to_tensor
from ..data.layout import expand_paths
from ..data.images import UnreadableImage
from ..errors import XferlearnError
from ..models.ensemble import Ensemble
from ..models.predictor import Predictor, load_predictor
from ..rundir import RunDir

log = logging.getLogger(__name__)

GALLERY_DIR = "gallery"


@dataclass
class Explanation:
    image: np.ndarray          # (S, S, 3) uint8: the image as the network saw it
    probabilities: np.ndarray  # (C,) calibrated class probabilities
    class_index: int           # the call: threshold on the positive class for two classes, else argmax
    class_name: str
    cam: np.ndarray            # (S, S) float32 in 0..1: Grad-CAM for the called class
    overlay: np.ndarray        # (S, S, 3) uint8: the heatmap blended over the image
    layer: str                 # the layer whose feature map Grad-CAM weighed

    @property
    def probability(self) -> float:
        """The probability of the class that was called."""
        return float(self.probabilities[self.class_index])


# --- which layer to explain ----------------------------------------------------------------
# The last feature map before global pooling, post-activation where the family has one
# (what Keras' Grad-CAM examples use: EfficientNet's "top_activation", ResNet50V2's
# "post_relu"). Keyed by timm's model class, since one class serves many names
# (mobilenetv2_* are EfficientNet). MobileNetV3's conv_head runs *after* pooling (1x1),
# hence its last block.
def _vgg_layer(model) -> str:
    convs = [i for i, m in enumerate(model.features) if isinstance(m, torch.nn.Conv2d)]
    last = convs[-1]
    after = model.features[last + 1] if last + 1 < len(model.features) else None
    # The ReLU after the last conv, as Keras' block5_conv3 (conv and relu in one layer).
    return f"features.{last + 1}" if isinstance(after, (torch.nn.ReLU, torch.nn.GELU)) else f"features.{last}"


_LAYER_BY_FAMILY: dict[str, Callable[[torch.nn.Module], str]] = {
    "EfficientNet": lambda m: "bn2",                        # conv_head + BN + activation
    "MobileNetV3": lambda m: f"blocks.{len(m.blocks) - 1}",
    "ResNet": lambda m: f"layer4.{len(m.layer4) - 1}",
    "ResNetV2": lambda m: "norm",                           # pre-activation nets: the final BN + ReLU
    "VGG": _vgg_layer,
    "InceptionV3": lambda m: "Mixed_7c",
    "Xception": lambda m: "act4",                           # timm's legacy (Keras-port) Xception
}


def target_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layer(s) Grad-CAM weighs: one per member of an ensemble (Grad-CAM scales each map to
    the input's size and averages them), else the backbone's one."""
    if isinstance(model, Ensemble):
        return [(f"members.{i}.model.{name}", layer)
                for i, (name, layer) in enumerate(target_layer(member.model) for member in model.members)]
    return [target_layer(model)]


def target_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(dotted name, module) of the layer Grad-CAM should weigh for this backbone."""
    choose = _LAYER_BY_FAMILY.get(type(model).__name__)
    if choose is not None:
        name = choose(model)
    elif getattr(model, "feature_info", None):
        name = model.feature_info[-1]["module"]  # timm: the deepest feature map it exposes
    else:
        convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        if not convs:
            raise XferlearnError(f"{type(model).__name__} has no convolution layer for Grad-CAM to explain.")
        name = convs[-1]
    return name, model.get_submodule(name)


# --- one image -------------------------------------------------------------------------------
class _LogOdds:
    """Binary target: logit(called) - logit(other), the log-odds the decision rests on.

    The called logit alone can mix in a part that says nothing about the decision: in
    two-class softmax training the two rows of the head get opposite gradients, so their
    sum keeps its initial value (zero for a head started at zero, random for one started
    from timm's init), and Grad-CAM would map that too.
    """

    def __init__(self, index: int):
        self.called, self.other = ClassifierOutputTarget(index), ClassifierOutputTarget(1 - index)

    def __call__(self, output):
        return self.called(output) - self.other(output)


@contextmanager
def _gradients_for_input_only(model: torch.nn.Module):
    """Grad-CAM needs gradients of activations, never of weights: skip those (less work, and
    no .grad tensors left on the model afterwards), then restore each parameter's flag."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _decoded(predictor: Predictor, item) -> np.ndarray:
    size = predictor.preprocessing.input_size
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape == (size, size, 3):
        return item  # already decoded (the server passes these): no PNG round trip
    return predictor.decode(item)


def _require_torch(predictor) -> Predictor:
    if not isinstance(predictor, Predictor):
        raise XferlearnError("Grad-CAM needs the PyTorch model: load the run with xferlearn.load(run), "
                             "not an exported ONNX model.")
    return predictor


def explain(predictor: Predictor, item) -> Explanation:
    """The call on one image (path, bytes, PIL image or array) and its Grad-CAM heatmap."""
    _require_torch(predictor)
    image = _decoded(predictor, item)
    batch = to_tensor(image)[None]
    probabilities = predictor.probabilities(batch)[0]
    index = int(predictor.decide(probabilities[None])[0])
    named = target_layers(predictor.model)
    name = ", ".join(n for n, _ in named)
    binary = len(predictor.classes) == 2
    target = _LogOdds(index) if binary else ClassifierOutputTarget(index)
    model = predictor.model
    # inference_mode(False): a caller inside inference mode (evaluate, a server) would
    # otherwise leave nothing for backward to differentiate.
    with torch.inference_mode(False), torch.enable_grad(), _gradients_for_input_only(model):
        x = predictor.to_input(batch).float().requires_grad_(True)
        cam = GradCAM(model=model, target_layers=[layer for _, layer in named])
        try:  # not `with GradCAM(...)`: its __exit__ swallows IndexError
            heat = cam(input_tensor=x, targets=[target])[0]
        except ValueError as error:
            if "activation shape" not in str(error):
                raise
            raise XferlearnError(f"Grad-CAM needs a spatial feature map, but layer {name} of "
                                 f"{type(model).__name__} gives another shape ({error}).") from None
        finally:
            cam.activations_and_grads.release()
    heat = np.nan_to_num(heat.astype(np.float32)).clip(0.0, 1.0)
    overlay = show_cam_on_image(image.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=0.5)
    return Explanation(image=image, probabilities=probabilities, class_index=index,
                       class_name=predictor.classes[index], cam=heat, overlay=overlay, layer=name)


def caption(predictor: Predictor, explanation: Explanation) -> str:
    """One line: the call, its probability, and the rule that made it."""
    text = f"{explanation.class_name}: p = {explanation.probability:.3f}"
    if predictor.positive_index is not None and predictor.threshold is not None:
        positive = predictor.classes[predictor.positive_index]
        text += f"  (called {positive} when p({positive}) \u2265 {predictor.threshold:.3f})"
    return text


def render_png(predictor: Predictor, explanation: Explanation, *, title: str | None = None,
               truth: str | None = None) -> bytes:
    """The image beside its heatmap overlay, the call as a caption; PNG bytes."""
    figure = Figure(figsize=(6.4, 3.9), dpi=100, layout="constrained")  # makes room for the titles
    left, right = figure.subplots(1, 2)
    left.imshow(explanation.image)
    left.set_title("image", fontsize=9)
    right.imshow(explanation.overlay)
    # Wrapped to the panel's width: an ensemble's layer list would run over the image's title.
    right.set_title(textwrap.fill(f"Grad-CAM for {explanation.class_name} ({explanation.layer})", 52), fontsize=9)
    for axes in (left, right):
        axes.axis("off")
    lines = [title] if title else []
    lines.append(caption(predictor, explanation))
    if truth is not None:
        lines.append(f"true class: {truth}")
    figure.suptitle("\n".join(lines), fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def explanation_png(predictor: Predictor, item, *, title: str | None = None) -> bytes:
    """PNG bytes of an image's heatmap overlay, captioned with the call and its probability."""
    return render_png(predictor, explain(predictor, item), title=title)


# --- files and folders ------------------------------------------------------------------------
def explain_files(run_or_predictor, paths: Iterable[str | Path], out_dir: str | Path, *,
                  on_skip: Callable[[Path, str], None] | None = None) -> list[Path]:
    """One `<name>.gradcam.png` in `out_dir` per image among `paths` (files or folders).

    An unreadable file is skipped: `on_skip(path, reason)` hears of it (default: a logged
    warning). Returns the PNGs written, in input order.
    """
    if isinstance(run_or_predictor, Predictor):
        return _explain_files(run_or_predictor, paths, out_dir, on_skip)
    with RunDir.of(run_or_predictor).lock_writes_to(out_dir, "explain"):
        return _explain_files(load_predictor(run_or_predictor), paths, out_dir, on_skip)


def _explain_files(predictor, paths, out_dir, on_skip) -> list[Path]:
    predictor = _require_torch(predictor)
    files = expand_paths(paths)
    if not files:
        raise XferlearnError("No image files found in the paths given.")
    on_skip = on_skip or (lambda path, reason: log.warning("skipped %s: %s", path, reason))
    out_dir = Path(out_dir)
    written: list[Path] = []
    taken: set[str] = set()
    for path in files:
        try:
            png = explanation_png(predictor, path, title=path.name)
        except UnreadableImage as error:
            on_skip(path, str(error))
            continue
        name, n = f"{path.stem}.gradcam.png", 1
        while name in taken:  # same file name from two folders: keep both
            n += 1
            name = f"{path.stem}-{n}.gradcam.png"
        taken.add(name)
        atomic_write(out_dir / name, png)
        written.append(out_dir / name)
    return written


# --- the evaluation report's error gallery ------------------------------------------------------
def error_gallery(predictor: Predictor, paths: list[str | Path], labels, probs: np.ndarray,
                  out_dir: str | Path, per_kind: int = 4) -> str | None:
    """Markdown for report.md: the most confident false positives and false negatives (binary
    only; None otherwise), each with its heatmap written to `out_dir/gallery/`."""
    if predictor.positive_index is None or len(predictor.classes) != 2:
        return None
    positive = predictor.positive_index
    labels, probs = np.asarray(labels), np.asarray(probs)
    called = predictor.decide(probs)
    p_positive = probs[:, positive]
    false_pos = np.flatnonzero((labels != positive) & (called == positive))
    false_neg = np.flatnonzero((labels == positive) & (called != positive))
    false_pos = false_pos[np.argsort(-p_positive[false_pos], kind="stable")]
    false_neg = false_neg[np.argsort(p_positive[false_neg], kind="stable")]

    folder = Path(out_dir) / GALLERY_DIR
    for old in list(folder.glob("f[pn]-*.png")) if folder.is_dir() else []:
        old.unlink()  # a previous evaluation's pictures would not match this report
    pos_name, neg_name = predictor.classes[positive], predictor.classes[1 - positive]
    rule = "the larger probability" if predictor.threshold is None else \
        f"the decision threshold, p({pos_name}) \u2265 {predictor.threshold:.3g}"
    lines = ["## Error gallery", "",
             f"The most confident mistakes at {rule}, each with the Grad-CAM heatmap of the class "
             "the model called.", ""]
    for kind, chosen, called_as, truth in (("fp", false_pos, pos_name, neg_name),
                                           ("fn", false_neg, neg_name, pos_name)):
        heading = "False positives" if kind == "fp" else "False negatives"
        lines += [f"### {heading}: called {called_as}, truly {truth} "
                  f"({min(per_kind, len(chosen))} of {len(chosen)} shown)", ""]
        if not len(chosen):
            lines += ["None.", ""]
        for rank, i in enumerate(chosen[:per_kind], 1):
            path = Path(paths[i])
            entry = f"{rank}. `{path.parent.name}/{path.name}`: p({pos_name}) = {p_positive[i]:.3f}"
            try:
                png = render_png(predictor, explain(predictor, path), title=path.name, truth=truth)
            except UnreadableImage as error:  # moved or damaged since it was scored
                lines += [f"{entry} (no heatmap: {error})", ""]
                continue
            name = f"{kind}-{rank}-{path.stem}.png"
            atomic_write(folder / name, png)
            lines += [entry, "", f"   ![{heading[:-1].lower()} {rank}]({GALLERY_DIR}/{name})", ""]
    return "\n".join(lines)

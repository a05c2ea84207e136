"""Prediction with a trained run: files, folders, arrays or PIL images in; classes out.

`load(run_dir)` gives a `Predictor` built from the checkpoint alone. It decodes exactly
as training did (squash to the input size, the weights' own normalisation), applies the
calibrated temperature, and decides with the threshold chosen on validation. Batches
stream: a folder of thousands of images never sits in memory at once, and an
unreadable file becomes a row with its error rather than the end of the run.

Two options change the probabilities. `tta` averages them over the clean image and a few
mild views (augment.tta_views); by default it is whatever the threshold was chosen with
(the checkpoint's `tta`), and asking otherwise warns, since that threshold then sits at
another operating point. `prevalence` re-weights them from the class prior the model's
probabilities refer to (the checkpoint's `class_prior`) to a stated share of positives
(Saerens et al., 2002), and maps the threshold with them, so the decisions stay those of
the validation operating point while the probabilities read right for that population.
"""

from __future__ import annotations

import io
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.augment import TTA_VIEWS, tta_views
from ..data.images import UnreadableImage, decode, decode_file
from ..errors import XferlearnError
from .checkpoint import Checkpoint, load_checkpoint
from .inference import FastForward, normalize, resolve_precision


class BasePredictor(ABC):
    """What every engine shares: decoding as training did, the decision rule, result rows and
    streaming. An engine (PyTorch here, ONNX Runtime in export.py) supplies `probabilities`."""

    def __init__(self, classes: list[str], threshold: float | None, positive_index: int | None,
                 temperature: float, preprocessing: Preprocessing):
        self.classes = classes
        self.threshold = threshold
        self.positive_index = positive_index
        self.temperature = temperature
        self.preprocessing = preprocessing

    @abstractmethod
    def probabilities(self, batch) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, C) calibrated class probabilities."""

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices: the validation threshold on the positive class for two classes, argmax otherwise."""
        if self.positive_index is None or self.threshold is None:
            return probs.argmax(axis=1)
        other = 1 - self.positive_index
        return np.where(probs[:, self.positive_index] >= self.threshold, self.positive_index, other)

    # --- convenience for users ----------------------------------------------------------
    def decode(self, item) -> np.ndarray:
        """A path, bytes, PIL image or HxWxC array -> the (size, size, 3) uint8 array training used."""
        size, interpolation = self.preprocessing.input_size, self.preprocessing.interpolation
        if isinstance(item, (str, Path)):
            return decode_file(item, size, interpolation)
        if isinstance(item, (bytes, bytearray)):
            return decode(bytes(item), size, interpolation)
        if isinstance(item, np.ndarray):
            item = Image.fromarray(item)
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            return decode(buffer.getvalue(), size, interpolation)
        raise TypeError(f"cannot predict on a {type(item).__name__}")

    def row(self, name: str, probs: np.ndarray | None, error: str | None = None) -> dict:
        if probs is None:
            return {"file": name, "class": None, "probabilities": None, "threshold": self.threshold, "error": error}
        label = int(self.decide(probs[None])[0])
        return {"file": name, "class": self.classes[label],
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                "threshold": self.threshold, "error": None}

    def iter_predict(self, items: Iterable, batch_size: int = 32, workers: int | None = None) -> Iterator[dict]:
        """Stream one result row per item; decoding runs in threads while the model computes."""
        items = list(items)
        names = [str(i) if isinstance(i, (str, Path)) else f"<{type(i).__name__} {n}>" for n, i in enumerate(items)]

        def safe_decode(item):
            try:
                return self.decode(item), None
            except UnreadableImage as error:
                return None, str(error)

        starts = range(0, len(items), batch_size)
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            # One batch decodes (PIL releases the GIL) while the previous one is in the network.
            def submit(start):
                return [pool.submit(safe_decode, item) for item in items[start:start + batch_size]]

            pending = [submit(starts[0])] if starts else []
            for k, start in enumerate(starts):
                if k + 1 < len(starts):
                    pending.append(submit(starts[k + 1]))
                decoded = [future.result() for future in pending.pop(0)]
                good = [k for k, (array, _) in enumerate(decoded) if array is not None]
                probs = self.probabilities(torch.from_numpy(np.stack([decoded[k][0] for k in good])).permute(0, 3, 1, 2)) \
                    if good else np.zeros((0, len(self.classes)))
                by_index = dict(zip(good, probs))
                for k, (_, error) in enumerate(decoded):
                    yield self.row(names[start + k], by_index.get(k), error)

    def predict(self, items, batch_size: int = 32) -> list[dict]:
        """Predict on one item or a list: paths, bytes, PIL images or arrays."""
        single = not isinstance(items, (list, tuple))
        rows = list(self.iter_predict([items] if single else items, batch_size))
        return rows[0] if single else rows


class Predictor(BasePredictor):
    """A trained classifier ready to use, computing with PyTorch; build it with `load(run_dir)`.

    `tta`: None follows the checkpoint; `prevalence`: the share of the positive class where the
    model will be used (two classes only), None to keep the probabilities as trained."""

    def __init__(self, checkpoint: Checkpoint, device: str | None = None, precision: str = "fp32",
                 tta: bool | None = None, prevalence: float | None = None, compile: str | bool = "off",
                 n_images: int | None = None, batch_size: int = 32):
        super().__init__(checkpoint.classes, checkpoint.threshold, checkpoint.positive_index,
                         checkpoint.temperature, checkpoint.preprocessing)
        self.checkpoint = checkpoint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        self.model = checkpoint.build_model().to(self.device, memory_format=torch.channels_last)
        # Batches go through the fast path (bf16 weights, compiled where asked); `model` stays the
        # plain fp32 network that Grad-CAM and export work on.
        self.fast = FastForward(self.model, self.precision, self.device, compile, n_images, batch_size,
                                normalize=(self.preprocessing.mean, self.preprocessing.std))
        self.tta = checkpoint.tta if tta is None else bool(tta)
        if self.tta != checkpoint.tta and checkpoint.threshold is not None:
            warnings.warn(f"the threshold {checkpoint.threshold:.4g} was chosen on validation "
                          f"{'with' if checkpoint.tta else 'without'} test-time augmentation; predicting "
                          f"{'with' if self.tta else 'without'} it moves the operating point", stacklevel=2)
        self.prevalence = None if prevalence is None else self._set_prevalence(float(prevalence))

    def _set_prevalence(self, prevalence: float) -> float:
        if self.positive_index is None:
            raise XferlearnError("--prevalence applies to two-class models; this one has "
                                 f"{len(self.classes)} classes.")
        if not 0 < prevalence < 1:
            raise XferlearnError(f"--prevalence is the share of {self.classes[self.positive_index]} cases, "
                                 f"strictly between 0 and 1; not {prevalence}.")
        if not self.checkpoint.class_prior:
            raise XferlearnError("this checkpoint does not record the class prior it was trained with, so "
                                 "--prevalence cannot correct for it; retrain with this version of xferlearn.")
        self.target_prior = np.empty(2)
        self.target_prior[self.positive_index], self.target_prior[1 - self.positive_index] = prevalence, 1 - prevalence
        if self.threshold is not None:
            self.threshold = prior_shift_threshold(self.threshold, self.positive_index,
                                                   self.checkpoint.class_prior, self.target_prior)
        return prevalence

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> the normalised float tensor the network takes."""
        x = normalize(batch, self.preprocessing.mean, self.preprocessing.std)
        return x.to(self.device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, C) logits; normalisation happens in the fast path."""
        return self.fast(batch)

    def view_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(V, N, C) logits: V is 1, or len(TTA_VIEWS) with `tta`, the clean image first. The
        views go through the network as one batch."""
        if not self.tta:
            return self.logits(batch)[None]
        views = len(TTA_VIEWS)
        return self.logits(torch.cat(tta_views(batch))).view(views, len(batch), -1)

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, C) calibrated class probabilities (mean over the TTA views,
        prior-shifted to `prevalence` where one is set)."""
        probs = (self.view_logits(batch) / self.temperature).softmax(dim=-1).mean(dim=0).cpu().numpy()
        if self.prevalence is not None:
            probs = prior_shift(probs, self.checkpoint.class_prior, self.target_prior)
        return probs

    def describe_operating_point(self) -> str:
        """One paragraph for reports: the threshold's source, TTA, and any prevalence correction."""
        checkpoint = self.checkpoint
        lines = [f"Threshold source: {checkpoint.threshold_source}."]
        lines.append(f"Test-time augmentation: {'on' if self.tta else 'off'}"
                     + (f" (mean of the probabilities over {len(TTA_VIEWS)} views: the clean image, zoom in and "
                        "out 6%, and shifts of 3% along the diagonal)" if self.tta else "")
                     + f"; the threshold was chosen with it {'on' if checkpoint.tta else 'off'}.")
        if self.prevalence is None:
            lines.append("Prevalence: as trained (no prior-shift correction).")
        else:
            prior = checkpoint.class_prior[self.positive_index]
            lines.append(f"Prevalence: probabilities re-weighted from a {self.classes[self.positive_index]} prior of "
                         f"{prior:.3f} (the one the model's probabilities refer to) to the stated "
                         f"{self.prevalence:.3f} (Saerens et al., 2002); the threshold {checkpoint.threshold:.4g} "
                         f"maps to {self.threshold:.4g}, so every decision, and the validation operating point, "
                         "is unchanged.")
        return " ".join(lines)


def load_predictor(run: str | Path, device: str | None = None, precision: str = "fp32", tta: bool | None = None,
                   prevalence: float | None = None, compile: str | bool = "off", n_images: int | None = None,
                   batch_size: int = 32) -> Predictor:
    """The trained classifier in a run folder (or checkpoint file), ready to predict.

    `precision` "auto" uses bf16 where the hardware computes it natively; `compile` "auto"
    compiles the network when `n_images` is enough to repay it (see inference.py)."""
    return Predictor(load_checkpoint(run), device, precision, tta=tta, prevalence=prevalence, compile=compile,
                     n_images=n_images, batch_size=batch_size)


def prior_shift(probs, train_prior: np.ndarray, target_prior: np.ndarray) -> np.ndarray:
    """Re-weight probabilities for a change of class priors (Saerens et al., 2002).

    p'(c|x) is proportional to p(c|x) * target(c) / train(c), renormalised per row. Priors
    need not sum to 1; only their ratios matter.
    """
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {p.shape}")
    ratio = []
    for name, prior in (("train_prior", train_prior), ("target_prior", target_prior)):
        prior = np.asarray(prior, dtype=float).ravel()
        if prior.shape != (p.shape[1],) or not np.all(np.isfinite(prior)) or np.any(prior <= 0):
            raise XferlearnError(
                f"{name} must hold {p.shape[1]} positive numbers, one per class, got {prior}")
        ratio.append(prior / prior.sum())
    adjusted = p * (ratio[1] / ratio[0])
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def prior_shift_threshold(threshold: float, positive: int, train_prior, target_prior) -> float:
    """The threshold on prior-shifted probabilities that makes the decisions `threshold` made
    on the original ones (two classes). The shift is monotone in p_pos, so p >= t exactly when
    p' >= t': the validation operating point (its sensitivity and specificity) is kept, and
    only the probabilities change meaning, to the stated prevalence. Youden's J and a target
    sensitivity are both choices of a point on the ROC curve, which a prior shift leaves alone.
    """
    if positive not in (0, 1):
        raise XferlearnError(f"a threshold applies to two classes; positive index {positive} is not 0 or 1")
    row = np.empty((1, 2))
    row[0, positive], row[0, 1 - positive] = threshold, 1.0 - threshold
    return float(prior_shift(row, train_prior, target_prior)[0, positive])


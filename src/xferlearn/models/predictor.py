"""Prediction with a trained run: files, folders, arrays or PIL images in; classes out.

`load_predictor(run_dir)` (or `xferlearn.load`) gives a `Predictor` built from the
checkpoint alone. It decodes exactly as training did (squash to the input size, the weights'
own normalisation), applies the calibrated temperature, and decides with the threshold
chosen on validation. Batches stream: a folder of thousands of images never sits in memory
at once, and an unreadable file becomes a row with its error rather than the end of the run.

Two options change the probabilities. `tta` averages them over the clean image and a few
mild views (augment.tta_views); by default it is whatever the threshold was chosen with
(the checkpoint's `tta`), and asking otherwise warns, since that threshold then sits at
another operating point. `prevalence` re-weights them from the class prior the model's
probabilities refer to (the checkpoint's `class_prior`) to a stated share of positives
(Saerens et al., 2002), and maps the threshold with them, so the decisions stay those of
the validation operating point while the probabilities read right for that population.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.augment import TTA_VIEWS, tta_views
from ..errors import XferlearnError
from .base import BasePredictor  # noqa: F401  (re-exported: engines subclass it from here too)
from .checkpoint import Checkpoint, load_checkpoint
from .inference import FastForward, normalize, resolve_precision


class Predictor(BasePredictor):
    """A trained classifier ready to use, computing with PyTorch; build it with `load_predictor(run_dir)`.

    `tta`: None follows the checkpoint; `prevalence`: the share of the positive class where the
    model will be used (two classes only), None to keep the probabilities as trained.
    `engine` "onnx" runs the batches through an in-memory ONNX Runtime graph of the network
    (onnx_forward.py, checked against PyTorch; PyTorch again, with a warning, where it cannot),
    for a training process scoring its own fresh network without writing an export."""

    def __init__(self, checkpoint: Checkpoint, device: str | None = None, precision: str = "fp32",
                 tta: bool | None = None, prevalence: float | None = None, compile: str | bool = "off",
                 n_images: int | None = None, batch_size: int = 32, engine: str = "torch"):
        super().__init__(checkpoint.classes, checkpoint.threshold, checkpoint.positive_index,
                         checkpoint.temperature, checkpoint.preprocessing)
        self.checkpoint = checkpoint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        self.model = checkpoint.build_model().to(self.device, memory_format=torch.channels_last)
        # Batches go through the fast path (bf16 weights, compiled where asked); `model` stays the
        # plain fp32 network that Grad-CAM and export work on.
        self.fast = self._onnx_forward(batch_size) if engine == "onnx" else None
        if self.fast is None:
            self.fast = FastForward(self.model, self.precision, self.device, compile, n_images, batch_size,
                                    normalize=(self.preprocessing.mean, self.preprocessing.std))
        self.tta = checkpoint.tta if tta is None else bool(tta)
        if self.tta != checkpoint.tta and checkpoint.threshold is not None:
            warnings.warn(f"the threshold {checkpoint.threshold:.4g} was chosen on validation "
                          f"{'with' if checkpoint.tta else 'without'} test-time augmentation; predicting "
                          f"{'with' if self.tta else 'without'} it moves the operating point", stacklevel=2)
        self.prevalence = None if prevalence is None else self._set_prevalence(float(prevalence))

    def _onnx_forward(self, batch_size: int):
        from .onnx_forward import onnx_or_none

        pre = self.preprocessing
        # torch's thread count: what this process was given (one share of the cores per process)
        return onnx_or_none(self.model, pre.mean, pre.std, pre.input_size, torch.get_num_threads(), batch_size,
                            lambda message: warnings.warn(message, stacklevel=5), "predicting with PyTorch")

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
        """(N, 3, H, W) uint8 tensor or array -> (N, C) logits; normalisation happens in the fast path."""
        return self.fast(torch.as_tensor(batch))

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
        batch = torch.as_tensor(batch)
        probs = (self.view_logits(batch) / self.temperature).softmax(dim=-1).mean(dim=0).cpu().numpy()
        if self.prevalence is not None:
            probs = prior_shift(probs, self.checkpoint.class_prior, self.target_prior)
        return probs

    @property
    def threshold_source(self) -> str:
        return self.checkpoint.threshold_source

    def describe_operating_point(self) -> str:
        """One paragraph for reports: the threshold's source, TTA, and any prevalence correction."""
        checkpoint = self.checkpoint
        lines = [f"Threshold source: {checkpoint.threshold_source}."]
        site = checkpoint.metrics.get("site_calibration") if isinstance(checkpoint.metrics, dict) else None
        if site and site.get("decision"):
            lines.append(f"Site calibration on {sum(site['counts'].values())} images of {site['site_data']}: "
                         f"{site['decision']}.")
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


"""Augmentation presets, defined in one place (torchvision.transforms.v2).

Images arrive as decoded uint8 arrays already squashed to the model's input size (see
`images.py`), so a preset only perturbs them; normalisation is a separate, batched step
(`models.inference.normalize`) shared by training, evaluation, prediction and export.

- `article`: the Keras article's ImageDataGenerator: shear_range=0.2, zoom_range=0.2,
  horizontal_flip=True. Keras takes shear_range in *degrees*, so 0.2 is a 0.2 degree
  shear, kept as such; its zoom scales each axis independently in [0.8, 1.2], here both
  axes together.
- `xray`: small rotations and shifts, mild zoom, brightness and contrast; no flip, since
  a flip moves the heart to the other side.
- `erase`: `xray`, then on half the views one random patch (2-15% of the image, any of the
  aspect ratios RandomErasing draws) set to black: no single corner, burnt-in marker or edge
  can carry the call. The fine-tune's default on grayscale images (config.py has the measurement).
- `robust`: breaks the acquisition shortcuts of the chest X-ray set (pneumonia images there
  are blurrier, brighter and lower in contrast than normal ones): each view is blurred,
  sharpened or left alone with equal odds, then gets random gamma, brightness, contrast,
  sensor noise and JPEG re-compression, over the `xray` geometry with a zoom that reaches
  further in (cutting borders and burnt-in markers). No flip.
- `noise`: sensor noise alone: Gaussian noise of a standard deviation drawn per view from 0 to
  NOISE_SIGMA (0-1 scale), the same on every channel of a gray image (it stays gray, as a
  detector's noise would leave it). The linear recipe's default view for grayscale images: frozen
  ImageNet features read fine grain as structure, and a head trained on clean X-rays only took
  barely visible noise for pneumonia (benchmarks/RESULTS.md, session 9).
- `none`: the image as it is.

Test-time augmentation (`tta_views`) averages the prediction over the clean image and a few
deterministic, mild views (zoom in and out, shifts along the diagonal): the kind of change
the `xray` preset trains for. No flip: a flipped chest is not a chest the model saw.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from ..config import AUGMENT_PRESETS as PRESETS
from .images import is_gray

NOISE_SIGMA = 0.06  # the stress test's noise at severity 3 (evaluation/corruptions.py)
# (scale, (dx, dy) as fractions of the side): the clean image first, then four mild views.
TTA_VIEWS = ((1.0, (0.0, 0.0)), (1.06, (0.0, 0.0)), (0.94, (0.0, 0.0)),
             (1.0, (0.03, 0.03)), (1.0, (-0.03, -0.03)))


def train_transform(preset: str):
    """A transform from a (3, H, W) uint8 tensor to an augmented (3, H, W) uint8 tensor."""
    from torchvision.transforms import v2  # imported on use: predicting from an export needs no torchvision

    if preset == "article":
        return v2.Compose([
            v2.RandomAffine(degrees=0, shear=0.2, scale=(0.8, 1.2)),
            v2.RandomHorizontalFlip(),
        ])
    if preset == "xray":
        return v2.Compose([
            v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ])
    if preset == "erase":
        return v2.Compose([train_transform("xray"),
                           v2.RandomErasing(p=0.5, scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0)])
    if preset == "robust":
        return v2.Compose([
            v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.9, 1.25)),
            v2.RandomChoice([v2.GaussianBlur(kernel_size=7, sigma=(0.5, 2.0)),
                             v2.RandomAdjustSharpness(sharpness_factor=4.0, p=1.0), v2.Identity()]),
            RandomGamma((0.7, 1.4)),
            v2.ColorJitter(brightness=0.3, contrast=0.3),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.GaussianNoise(sigma=0.03)], p=0.5),
            v2.ToDtype(torch.uint8, scale=True),
            v2.RandomApply([v2.JPEG(quality=(30, 95))], p=0.5),
        ])
    if preset == "noise":
        return SensorNoise(NOISE_SIGMA)
    if preset == "none":
        return v2.Identity()
    raise ValueError(f"unknown augmentation preset {preset!r}; choose from {PRESETS}")


class RandomGamma(torch.nn.Module):
    """torchvision's adjust_gamma with a gamma drawn uniformly from `gammas` (v2 has no random
    gamma of its own): exposure curves differ between sites."""

    def __init__(self, gammas: tuple[float, float]):
        super().__init__()
        self.gammas = gammas

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import v2

        low, high = self.gammas
        return v2.functional.adjust_gamma(image, low + (high - low) * float(torch.rand(())))


def sensor_noise(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(3, H, W) uint8 with torchvision's gaussian_noise of `sigma` (0-1 scale), drawn from torch's
    generator: on one channel of a gray image, then repeated (it stays gray, as a detector's
    noise leaves an X-ray), on each channel of a colour one. The stress test's noise too."""
    from torchvision.transforms.v2 import functional as F

    gray = is_gray(image.permute(1, 2, 0))  # channels last, as the helper reads arrays
    pixels = F.to_dtype(image[:1] if gray else image, torch.float32, scale=True)
    noisy = F.to_dtype(F.gaussian_noise(pixels, sigma=sigma, clip=True), torch.uint8, scale=True)
    return noisy.expand_as(image).clone() if gray else noisy


class SensorNoise(torch.nn.Module):
    """`sensor_noise` with a sigma drawn uniformly from 0 to `largest` per view."""

    def __init__(self, largest: float):
        super().__init__()
        self.largest = largest

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return sensor_noise(image, self.largest * float(torch.rand(())))


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) uint8 tensor, without copying."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def view_seed(digest: str, view: int, seed: int) -> int:
    """A seed per (image, view, run seed): view k of an image is the same in every run,
    so its cached features stay valid, and differs between images and views."""
    return int.from_bytes(hashlib.sha1(f"{digest}:{view}:{seed}".encode()).digest()[:8], "little") & (2**63 - 1)


def view_shares(views: float) -> list[float]:
    """The share of training images each augmented view covers: `--views 2` is [1, 1] (two
    views of every image), `--views 0.25` is [0.25] (one view of a quarter of them)."""
    return [min(1.0, views - k) for k in range(math.ceil(views))]


def in_view(digest: str, view: int, seed: int, share: float) -> bool:
    """Whether view `view` of an image is drawn when it covers a `share` of the images: the
    same images for every subset of them and every run of the seed, so a split's features are
    a subset of the whole folder's and the store's rows are shared."""
    if share >= 1:
        return True
    draw = int.from_bytes(hashlib.sha1(f"{digest}:{view}:{seed}:share".encode()).digest()[:8], "little")
    return draw < share * 2**64


def augmented(array: np.ndarray, transform, seed: int) -> torch.Tensor:
    """One reproducible augmented view of a decoded image."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(to_tensor(array))


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """(N, 3, H, W) uint8 -> the TTA_VIEWS of it, each (N, 3, H, W) uint8; the first is `batch` itself."""
    from torchvision.transforms import v2

    height, width = batch.shape[-2:]
    views = []
    for scale, (dx, dy) in TTA_VIEWS:
        if scale == 1.0 and dx == dy == 0.0:
            views.append(batch)
            continue
        views.append(v2.functional.affine(batch, angle=0.0, translate=[round(dx * width), round(dy * height)],
                                          scale=scale, shear=[0.0, 0.0],
                                          interpolation=v2.InterpolationMode.BILINEAR))
    return views

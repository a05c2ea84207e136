"""Acquisition-like shifts for the stress test, at five severities each.

Each shift imitates something that differs between one hospital's images and another's:
exposure and tone curve (gamma), contrast, focus and scatter (blur), detector noise, JPEG
re-compression, a lower-resolution source, patient positioning (rotation, crop/zoom),
borders from a smaller plate or a scanned film, and burnt-in text markers. Severities
grow from barely visible (1) to plainly degraded (5), in the spirit of ImageNet-C
(Hendrycks & Dietterich, 2019); severity 0 is the image unchanged.

Where it is applied: every shift works on the decoded image at the model's input size
(the `size x size` uint8 array that training and prediction feed the network, from the
decode cache), so each file is decoded once whatever the number of shifts. For `lowres`
and `jpeg` that means the loss is imposed at the input resolution: `lowres` is a source
with 1/f of the input's pixels across, scaled up again as decoding would; `jpeg` is a
re-compression of the image the network sees, not of the original file.

The pixel work is torchvision's (transforms.v2.functional); the text markers are drawn
with PIL's ImageDraw. Every random choice (a direction, a corner, the noise) comes from a
generator seeded by (image digest, shift, severity), so a stress test is reproducible and
two runs compared on the same data see exactly the same images.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..config import STRESS_SHIFTS
from ..data.augment import sensor_noise
from ..errors import XferlearnError

SEVERITIES = (1, 2, 3, 4, 5)

# Per shift: its parameter at severities 1..5, and what that parameter is (for the report).
PARAMETERS: dict[str, tuple[tuple[float, ...], str]] = {
    "gamma": ((0.85, 0.7, 0.55, 0.45, 0.35), "gamma (or its inverse, chosen per image): tone curve / exposure"),
    "contrast": ((0.8, 0.65, 0.5, 0.38, 0.25), "contrast factor (1 = unchanged)"),
    "blur": ((0.6, 1.0, 1.5, 2.2, 3.0), "Gaussian blur sigma in input pixels"),
    "noise": ((0.02, 0.04, 0.06, 0.09, 0.13), "Gaussian noise sigma on the 0-1 scale"),
    "jpeg": ((60, 40, 25, 15, 8), "JPEG quality of a re-compression"),
    "lowres": ((1.5, 2, 3, 4, 6), "downsampling factor before scaling back up"),
    "rotate": ((3, 6, 10, 15, 20), "rotation in degrees (direction chosen per image), black corners"),
    "zoom": ((0.95, 0.9, 0.85, 0.78, 0.7), "side of a crop (share of the image) scaled back to full size"),
    "border": ((0.03, 0.06, 0.1, 0.15, 0.2), "black border on each side (share of the side), image shrunk to fit"),
    "text": ((0.05, 0.065, 0.08, 0.1, 0.12), "height of burnt-in text markers (share of the side)"),
}
# Marker texts like those printed on radiographs by the device or the technologist.
_MARKERS = ("R", "L", "AP", "PA", "PORT", "SUPINE", "ERECT", "12/03")


def check_choices(shifts, severities) -> tuple[list[str], list[int]]:
    """The shifts and severities asked for, checked; one-line errors name the allowed values."""
    shifts = list(STRESS_SHIFTS if shifts is None else shifts)
    unknown = [s for s in shifts if s not in STRESS_SHIFTS]
    if unknown or not shifts:
        raise XferlearnError(f"--shifts takes a comma-separated subset of {','.join(STRESS_SHIFTS)}; "
                             f"not {','.join(unknown) or 'nothing'}.")
    severities = list(SEVERITIES if severities is None else severities)
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise XferlearnError(f"--severities takes a comma-separated subset of 1,2,3,4,5; "
                             f"not {','.join(map(str, bad)) or 'nothing'}.")
    return list(dict.fromkeys(shifts)), sorted(set(severities))


def seed_for(digest: str, shift: str, severity: int) -> int:
    """A stable 63-bit seed per (image, shift, severity): the same image always shifts the same way."""
    key = f"{digest}|{shift}|{severity}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def corrupt(image: torch.Tensor, shift: str, severity: int, seed: int) -> torch.Tensor:
    """(3, H, W) uint8 -> the same shape and type under `shift` at `severity` (0: unchanged)."""
    if severity == 0:
        return image
    value = PARAMETERS[shift][0][severity - 1]
    rng = np.random.default_rng(seed)
    return _SHIFTS[shift](image, value, rng)


def _gamma(image, value, rng):
    # Over- and under-exposure are both real; which one an image gets is drawn per image.
    gamma = value if rng.random() < 0.5 else 1 / value
    return F.adjust_gamma(image, gamma)


def _contrast(image, value, rng):
    return F.adjust_contrast(image, value)


def _blur(image, value, rng):
    kernel = 2 * math.ceil(3 * value) + 1
    return F.gaussian_blur(image, [kernel, kernel], [value, value])


def _noise(image, value, rng):
    # v2's gaussian_noise draws from torch's global generator; fork it so the draw is seeded
    # here and the caller's random state is left as it was. A gray image (every X-ray) gets
    # gray noise, as the linear recipe's noise view does: the one function for both.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        return sensor_noise(image, value)


def _jpeg(image, value, rng):
    return F.jpeg(image, int(value))


def _lowres(image, value, rng):
    size = image.shape[-2:]
    small = [max(8, round(side / value)) for side in size]
    down = F.resize(image, small, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.resize(down, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def _rotate(image, value, rng):
    angle = value if rng.random() < 0.5 else -value
    return F.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=0)


def _zoom(image, value, rng):
    height, width = image.shape[-2:]
    h, w = round(height * value), round(width * value)
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return F.resized_crop(image, top, left, h, w, [height, width], interpolation=InterpolationMode.BILINEAR,
                          antialias=True)


def _border(image, value, rng):
    height, width = image.shape[-2:]
    pad = max(1, round(min(height, width) * value))
    framed = F.pad(image, [pad, pad, pad, pad], fill=0)
    return F.resize(framed, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _text(image, value, rng):
    height, width = image.shape[-2:]
    pil = F.to_pil_image(image)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default(size=max(6, round(height * value)))
    # One marker per severity step above the first, up to three, each in a corner of its own.
    corners = rng.permutation(4)[:min(3, 1 + int(value >= 0.08) + int(value >= 0.1))]
    for corner in corners:
        text = str(rng.choice(_MARKERS))
        box = draw.textbbox((0, 0), text, font=font)
        tw, th = box[2] - box[0], box[3] - box[1]
        margin = round(0.03 * width)
        x = margin if corner % 2 == 0 else width - tw - margin
        y = margin if corner < 2 else height - th - margin - box[1]
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)


_SHIFTS = {"gamma": _gamma, "contrast": _contrast, "blur": _blur, "noise": _noise, "jpeg": _jpeg,
           "lowres": _lowres, "rotate": _rotate, "zoom": _zoom, "border": _border, "text": _text}
assert set(_SHIFTS) == set(STRESS_SHIFTS) == set(PARAMETERS)  # one list of shifts, kept in config.py


def corrupt_batch(images: torch.Tensor, digests: list[str], shift: str, severity: int) -> torch.Tensor:
    """(N, 3, H, W) uint8, each image shifted with its own seed."""
    if severity == 0:
        return images
    return torch.stack([corrupt(image, shift, severity, seed_for(digest, shift, severity))
                        for image, digest in zip(images, digests)])


def example_sheet(image: np.ndarray, shifts, severities) -> Image.Image:
    """One image under every shift (rows) and severity (columns), for the report."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    rows = []
    for shift in shifts:
        row = [corrupt(tensor, shift, s, seed_for("example", shift, s)) for s in [0, *severities]]
        rows.append(torch.cat(row, dim=2))
    sheet = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(sheet))

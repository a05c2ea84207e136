"""Local contrast equalisation (CLAHE) of the decoded image, before the network sees it.

X-ray devices and sites differ in exposure, windowing and sharpness, and on the chest X-ray
train split those acquisition cues differ by class (the data README: pneumonia images are
blurrier and lower in contrast), so a model can learn them instead of the disease. Contrast-
limited adaptive histogram equalisation (Zuiderveld 1994; OpenCV's `createCLAHE`) brings every
image to a like local contrast, whatever device made it. On the split that conflicts with the
sharpness shortcut it raised the held-out AUC of Lite0's linear recipe by 0.010 and that of the
three-backbone ensemble by 0.007, each with a paired interval clear of zero (benchmarks/RESULTS.md,
session 6), for about 1.5 ms of CPU per 224 px image. It amplifies noise as well as structure:
in the synthetic stress test the ensemble with it fared worse under severe noise, JPEG, borders
and blur (mean error 0.096 against 0.075) and better under contrast shifts, and on a milder
real shift (the second NORMAL batch held out) it cost the ensemble 0.003 of AUC. A lower clip
limit (1.0, 1.5) lost part of the conflict split's gain without helping the stress test, and
neither did smoothing before it (Gaussian, median, bilateral; session 9): the fragility to noise
was the frozen features' (Lite0 without CLAHE had it too), and the linear recipe's sensor-noise
view on grayscale images is what answers it (config.GRAYSCALE_LINEAR_VIEWS).

It is part of the model's preprocessing (`Preprocessing.contrast`, saved in the checkpoint),
applied wherever pixels enter: features, fine-tune batches, predict, serve, explain, int8
calibration. It runs after augmentation and after the stress test's shifts, as it would on a
new device's image, and it is not in the exported ONNX graph: a user of the bare ONNX file
applies it first (the export's sidecar JSON says so).

`auto` (the default) equalises grayscale images (every channel equal: X-rays, CT, ultrasound)
and leaves colour photographs alone, whose colours carry the class.
"""

from __future__ import annotations

import numpy as np

from .images import UnreadableImage, decode_file, is_gray

CLIP_LIMIT = 2.0  # OpenCV's usual setting; contrast is amplified at most this much per tile
TILES = 8  # an 8x8 grid of tiles: 28 px tiles on a 224 px image
AUTO_SAMPLE = 64  # images looked at to tell a grayscale set from a colour one
GRAY_CHECK_SIZE = 64  # pixels they are decoded at for it: equal channels stay equal at any size
DESCRIPTION = (f"CLAHE (OpenCV createCLAHE, clip limit {CLIP_LIMIT}, {TILES}x{TILES} tiles) on the gray channel, "
               "or on the lightness of the Lab form of a colour image")


def is_grayscale_set(arrays) -> bool:
    """Whether every one of `arrays` (a spread sample of the training images) is grayscale."""
    return all(is_gray(array) for array in arrays)


def is_grayscale_folder(files) -> bool:
    """Whether a spread sample of AUTO_SAMPLE of `files` (a training folder's images) is grayscale,
    decoded small: a train run decides its input size on it before the images are decoded at that size.
    Unreadable files are passed over here; the scan reports them."""
    files = list(files)
    spread = np.linspace(0, len(files) - 1, min(AUTO_SAMPLE, len(files))).astype(int)
    arrays = []
    for path in (files[i] for i in spread):
        try:
            arrays.append(decode_file(path, GRAY_CHECK_SIZE))
        except UnreadableImage:
            continue
    return bool(arrays) and is_grayscale_set(arrays)


def resolve_contrast(option: str, grayscale: bool) -> str:
    """The contrast step a run uses: `option`, or for `auto`, "clahe" for a grayscale set, else "none"."""
    if option != "auto":
        return option
    return "clahe" if grayscale else "none"


def equalize(array: np.ndarray, method: str) -> np.ndarray:
    """An (H, W, 3) uint8 array after the contrast step `method` ("none" returns it as it is).
    Gray images are equalised on one channel; colour ones on the lightness of their Lab form."""
    if method == "none":
        return array
    import cv2  # OpenCV (a grad-cam dependency too); imported here, as only CLAHE runs need it

    clahe = cv2.createCLAHE(clipLimit=CLIP_LIMIT, tileGridSize=(TILES, TILES))
    array = np.ascontiguousarray(array)
    if is_gray(array):
        return np.repeat(clahe.apply(array[..., 0])[..., None], 3, axis=2)
    lab = cv2.cvtColor(array, cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def equalize_tensor(images, method: str):
    """The same on a (3, H, W) or (N, 3, H, W) uint8 tensor (after augmentation or a stress shift)."""
    if method == "none":
        return images
    import torch

    batch = images if images.ndim == 4 else images[None]
    arrays = batch.permute(0, 2, 3, 1).cpu().numpy()
    out = torch.from_numpy(np.stack([equalize(a, method) for a in arrays])).permute(0, 3, 1, 2)
    return out if images.ndim == 4 else out[0]

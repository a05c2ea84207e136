"""The contrast step (CLAHE): what it does to an image, when `auto` turns it on, and that every
path into the network applies it the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xferlearn.data.contrast import (equalize, equalize_tensor, is_gray, is_grayscale_folder, is_grayscale_set,
                                     resolve_contrast)
from xferlearn.data.images import Preprocessing
from xferlearn.errors import XferlearnError


def low_contrast_gray(seed: int = 0, size: int = 64) -> np.ndarray:
    """A dull gray image: values squeezed into 100..140 with some structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    gray = 120 + 15 * np.sin(xx / 5.0) + rng.normal(0, 3, (size, size))
    return np.repeat(gray.clip(100, 140).astype(np.uint8)[..., None], 3, axis=2)


def test_clahe_spreads_a_dull_gray_image_and_keeps_it_gray():
    image = low_contrast_gray()
    out = equalize(image, "clahe")
    assert out.shape == image.shape and out.dtype == np.uint8
    assert is_gray(out)
    assert out[..., 0].std() > 1.5 * image[..., 0].std()
    assert equalize(image, "none") is image  # off costs nothing


def test_clahe_on_colour_changes_lightness_not_hue():
    rng = np.random.default_rng(1)
    image = np.stack([rng.integers(90, 130, (64, 64)), rng.integers(40, 60, (64, 64)),
                      rng.integers(20, 40, (64, 64))], axis=2).astype(np.uint8)
    out = equalize(image, "clahe")
    assert out.shape == image.shape and not is_gray(out)
    # Red stays the strongest channel almost everywhere: the colour is kept, the lightness spread.
    assert (out[..., 0] >= out[..., 2]).mean() > 0.95


def test_tensor_form_equals_the_array_form():
    arrays = np.stack([low_contrast_gray(seed) for seed in range(3)])
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    batch = equalize_tensor(tensors, "clahe")
    assert torch.equal(batch[1].permute(1, 2, 0), torch.from_numpy(equalize(arrays[1], "clahe")))
    assert torch.equal(equalize_tensor(tensors[2], "clahe"), batch[2])


def test_auto_equalises_grayscale_sets_only():
    gray = [low_contrast_gray(seed) for seed in range(4)]
    colour = gray[:3] + [np.dstack([gray[3][..., 0], gray[3][..., 1] // 2, gray[3][..., 2]])]
    assert is_grayscale_set(gray) and not is_grayscale_set(colour)  # one colour image makes it a colour set
    assert resolve_contrast("auto", True) == "clahe"
    assert resolve_contrast("auto", False) == "none"
    assert resolve_contrast("none", True) == "none"
    assert resolve_contrast("clahe", False) == "clahe"


def test_preprocessing_records_the_step_and_old_records_read_as_none():
    pre = Preprocessing(64, (0.5,) * 3, (0.25,) * 3, "bilinear", "clahe")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    plain = Preprocessing(64, (0.5,) * 3, (0.25,) * 3, "bilinear")
    assert "contrast" not in plain.to_dict()  # feature keys and records from before the step are unchanged
    assert Preprocessing.from_dict(plain.to_dict()).contrast == "none"
    with pytest.raises(XferlearnError, match="contrast"):
        Preprocessing.from_dict(pre.to_dict() | {"contrast": "sharpen"})


def test_a_folder_is_told_grayscale_or_colour_from_its_files_before_any_decode_at_model_size(tmp_path):
    """Train decides its input size on this before scanning: unreadable files are passed over, one
    colour image makes a colour set, a folder with nothing readable is not called grayscale."""
    from PIL import Image

    files = []
    for i, mode in enumerate(("L", "RGB", "L")):  # an RGB file whose channels are equal is gray too
        files.append(tmp_path / f"gray{i}.{'jpeg' if mode == 'L' else 'png'}")
        Image.fromarray(low_contrast_gray(i, size=400)).convert(mode).save(files[-1])
    (tmp_path / "broken.jpeg").write_bytes(b"not an image")
    files.append(tmp_path / "broken.jpeg")
    assert is_grayscale_folder(files)
    tinted = np.asarray(Image.open(files[1])).astype(int) * [1.0, 0.9, 0.8]
    Image.fromarray(tinted.astype(np.uint8)).save(tmp_path / "colour.png")
    assert not is_grayscale_folder([*files, tmp_path / "colour.png"])
    assert not is_grayscale_folder([tmp_path / "broken.jpeg"]) and not is_grayscale_folder([])

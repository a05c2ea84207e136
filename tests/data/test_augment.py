"""The augmentation presets: every one runs on a uint8 image, reproducibly; `robust` varies sharpness."""

import numpy as np
import pytest
import torch
from conftest import synthetic_image

from xferlearn.config import AUGMENT_PRESETS
from xferlearn.data.augment import augmented, train_transform


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_every_preset_keeps_shape_and_dtype_and_is_seeded(preset):
    array = np.array(synthetic_image(1, 3, size=64).convert("RGB"))
    transform = train_transform(preset)
    first, again = augmented(array, transform, 7), augmented(array, transform, 7)
    assert first.shape == (3, 64, 64) and first.dtype == torch.uint8
    assert torch.equal(first, again)


def test_robust_views_both_blur_and_sharpen():
    """The sharpness shortcut is broken only if views go both ways, blurrier and sharper."""
    from torchvision.transforms import v2

    array = np.array(synthetic_image(0, 5, size=96).convert("RGB"))
    def sharpness(image):
        gray = image.float().mean(0)
        return (4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]).abs().mean()
    base = sharpness(torch.from_numpy(array).permute(2, 0, 1))
    transform = v2.Compose(train_transform("robust").transforms[1:2])  # the blur/sharpen choice alone
    values = [sharpness(augmented(array, transform, seed)) for seed in range(30)]
    assert min(values) < 0.8 * base and max(values) > 1.2 * base

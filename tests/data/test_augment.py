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


def test_noise_views_keep_a_gray_image_gray_and_stay_within_the_largest_sigma():
    from xferlearn.data.augment import NOISE_SIGMA

    gray = np.repeat(np.array(synthetic_image(0, 2, size=64).convert("L"))[..., None], 3, axis=2)
    colour = np.array(synthetic_image(1, 2, size=64).convert("RGB"))
    colour[..., 1] //= 2
    transform = train_transform("noise")
    spreads = []
    for seed in range(20):
        view = augmented(gray, transform, seed)
        assert torch.equal(view[0], view[1]) and torch.equal(view[0], view[2])
        spreads.append(float((view[0].float() - torch.from_numpy(gray[..., 0]).float()).std()) / 255)
    assert max(spreads) <= 1.1 * NOISE_SIGMA and max(spreads) > 0.5 * NOISE_SIGMA and min(spreads) < max(spreads) / 2
    coloured = augmented(colour, transform, 3)
    assert not torch.equal(coloured[0].float() - colour[..., 0].astype(np.float32),
                           coloured[1].float() - colour[..., 1].astype(np.float32))  # a draw per channel


def test_fractional_views_cover_a_stable_share_of_the_images():
    from xferlearn.data.augment import in_view, view_shares

    assert view_shares(0) == [] and view_shares(1) == [1.0] and view_shares(2.5) == [1.0, 1.0, 0.5]
    assert view_shares(0.25) == [0.25]
    digests = [f"{i:040x}" for i in range(4000)]
    quarter = {d for d in digests if in_view(d, 1, 0, 0.25)}
    half = {d for d in digests if in_view(d, 1, 0, 0.5)}
    assert abs(len(quarter) / 4000 - 0.25) < 0.03 and abs(len(half) / 4000 - 0.5) < 0.03
    assert quarter < half  # a larger share keeps the smaller one's images (and their cached rows)
    assert quarter != {d for d in digests if in_view(d, 1, 1, 0.25)}  # another seed, other images
    assert all(in_view(d, 2, 0, 1.0) for d in digests[:50])

"""The release's preprocessing: short side to img_size, centre crop, [-1, 1]."""

import numpy as np
import pytest
import torch
from PIL import Image

from fedmusk.musk_model import musk_transform


def test_output_is_normalised_to_minus_one_one():
    white = np.full((400, 400, 3), 255, np.uint8)
    black = np.zeros((400, 400, 3), np.uint8)
    t = musk_transform(384)
    assert torch.allclose(t(white), torch.ones(3, 384, 384))
    assert torch.allclose(t(black), -torch.ones(3, 384, 384))


def test_short_side_is_resized_and_the_centre_kept():
    # 384 x 1152 landscape image whose middle third is red: after the centre crop only red remains.
    img = np.zeros((384, 1152, 3), np.uint8)
    img[:, 384:768, 0] = 255
    x = musk_transform(384)(img)
    assert x.shape == (3, 384, 384)
    assert torch.allclose(x[0], torch.ones(384, 384)) and torch.allclose(x[1], -torch.ones(384, 384))


def test_resize_uses_antialiased_bicubic_like_the_release():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (768, 1000, 3), dtype=np.uint8))
    x = musk_transform(384)(img)
    # Reference arithmetic: torchvision resizes the short side to 384 and the long side to int(384 * 1000 / 768).
    expected = img.resize((int(384 * 1000 / 768), 384), Image.BICUBIC)
    left = int(round((expected.width - 384) / 2.0))
    expected = np.asarray(expected.crop((left, 0, left + 384, 384)), np.float32) / 255.0
    assert torch.allclose(x, (torch.from_numpy(expected).permute(2, 0, 1) - 0.5) / 0.5, atol=1e-6)


@pytest.mark.parametrize("size", [96, 224, 384])
def test_any_model_size(size):
    assert musk_transform(size)(np.zeros((50, 70, 3), np.uint8)).shape == (3, size, size)

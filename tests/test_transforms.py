"""Tests of the CLIP train and test transforms."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from benchmarks import CLIP_MEAN, CLIP_STD, build_transform


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_output_shape_any_mode(train: bool, mode: str) -> None:
    image = Image.new(mode, (50, 30))

    output = build_transform(24, train=train)(image)

    assert isinstance(output, torch.Tensor)
    assert output.shape == (3, 24, 24)
    assert output.dtype == torch.float32


def test_test_transform_normalizes_with_clip_stats() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 128))

    output = build_transform(16, train=False)(image)

    expected = [(value / 255 - mean) / std
                for value, mean, std in zip((255, 0, 128), CLIP_MEAN, CLIP_STD, strict=True)]
    for channel in range(3):
        assert torch.allclose(output[channel], torch.full((16, 16), expected[channel]), atol=1e-4)


def test_test_transform_resizes_short_side_then_crops() -> None:
    # Left half black, right half white, 60 x 20: resizing the short side to 10 gives 30 x 10,
    # and the 10 x 10 center crop spans the middle, half black and half white.
    image = Image.new("L", (60, 20), 0)
    image.paste(255, (30, 0, 60, 20))

    output = build_transform(10, train=False, mean=(0, 0, 0), std=(1, 1, 1))(image)

    assert output[0, 5, 0].item() == pytest.approx(0.0, abs=0.05)
    assert output[0, 5, 9].item() == pytest.approx(1.0, abs=0.05)


def test_transform_layers() -> None:
    train_steps = build_transform(224, train=True).transforms
    test_steps = build_transform(224, train=False).transforms

    crop = next(step for step in train_steps if isinstance(step, T.RandomResizedCrop))
    assert crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(step, T.RandomHorizontalFlip) for step in train_steps)
    resize = next(step for step in test_steps if isinstance(step, T.Resize))
    assert resize.size == 224
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(step, T.CenterCrop) for step in test_steps)


def test_transform_pickles() -> None:
    transform = pickle.loads(pickle.dumps(build_transform(8, train=True)))

    assert transform(Image.new("L", (9, 9))).shape == (3, 8, 8)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_image_size_rejected(size: object) -> None:
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        build_transform(size, train=False)  # type: ignore[arg-type]


def test_digits_train_transform_keeps_the_digit():
    from torchvision import transforms as T

    steps = build_transform(32, train=True, dataset="digits").transforms
    crops = [step for step in steps if isinstance(step, T.RandomResizedCrop)]
    assert len(crops) == 1
    assert crops[0].scale == (0.5, 1.0)
    assert not any(isinstance(step, T.RandomHorizontalFlip) for step in steps)
    default_steps = build_transform(32, train=True, dataset="eurosat").transforms
    assert any(isinstance(step, T.RandomHorizontalFlip) for step in default_steps)

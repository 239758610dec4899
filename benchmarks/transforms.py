"""Image transforms of the CoOp harness (Dassl defaults with the CLIP pixel statistics)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


class ConvertRGB:
    """Convert a PIL image to RGB (grayscale, palette and RGBA images included).

    A module-level class rather than a lambda, so that the transform pickles for DataLoader
    workers started with "spawn".
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_transform(image_size: int, train: bool, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD, dataset: str | None = None,
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """Build the train or test transform, from a PIL image to a normalized (3, S, S) tensor.

    Train: RandomResizedCrop(S, scale=(0.08, 1.0), bicubic), then a random horizontal flip; a
    registered dataset may narrow the crop scale or turn the flip off (the built-in digits do).
    Test: resize the short side to S (bicubic), then a center crop of S x S. Both convert the
    image to RGB first and end with ToTensor and Normalize(mean, std).

    Args:
        image_size: Output side S in pixels.
        train: Whether to build the augmenting train transform.
        mean: Per-channel mean for Normalize; CLIP's by default.
        std: Per-channel standard deviation for Normalize; CLIP's by default.
        dataset: Registry name whose training augmentation settings apply, or None for the
            CoOp harness defaults.

    Returns:
        A torchvision `Compose` that can be pickled.

    Raises:
        ValueError: If `image_size` is not a positive int or mean/std do not have 3 values.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean={mean!r}, "
                         f"std={std!r}.")

    bicubic = T.InterpolationMode.BICUBIC
    if train:
        scale, flip = (0.08, 1.0), True
        if dataset is not None:
            from benchmarks.datasets import dataset_info

            info = dataset_info(dataset)
            scale, flip = info.train_crop_scale, info.train_flip
        geometry = [T.RandomResizedCrop(image_size, scale=scale, interpolation=bicubic)]
        if flip:
            geometry.append(T.RandomHorizontalFlip())
    else:
        geometry = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose([
        ConvertRGB(),
        *geometry,
        T.ToTensor(),
        T.Normalize(mean=tuple(mean), std=tuple(std)),
    ])

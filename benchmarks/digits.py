"""Built-in "digits" dataset: scikit-learn's handwritten digits in the CoOp JSON-split layout.

It is a real (if tiny) image classification dataset that needs no download, so every protocol
can run offline and in tests: `build_digits(root)` writes it once, and `read_dataset("digits",
root)` reads it like any other JSON-split dataset.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._io import write_json_atomic
from benchmarks._layouts import SPLIT_NAMES, RawItem, load_split_json

logger = logging.getLogger(__name__)

DIGIT_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
NUM_IMAGES = 1797
"""Images in `sklearn.datasets.load_digits` (8x8 pixels, values 0..16)."""
SPLIT_SEED = 0
TRAIN_FRACTION = 0.5
VAL_FRACTION = 0.2
SPLIT_FILE = "split_zhou_Digits.json"


def build_digits(data_root: str | os.PathLike[str], image_size: int = 32) -> Path:
    """Write the digits dataset under `data_root/digits/`, unless it is already complete.

    Each of the 1797 images of `sklearn.datasets.load_digits` is scaled from 0..16 to 0..255,
    upscaled to `image_size` pixels with bicubic resampling and saved as an RGB PNG at
    `digits/images/<digit name>/<index>.png`. The split file `digits/split_zhou_Digits.json`
    follows the CoOp rule for datasets without an official split: per class, the images are
    shuffled (here with `random.Random(0)`), then round(50%) go to train, round(20%) to val and
    the rest to test.

    Nothing is written when the dataset is already complete. That is the case when the split
    file lists all 1797 images, every listed file exists, and the first image has the requested
    size. Images and the split file are written atomically, and the split file last, so the next
    call redoes an interrupted build.

    Args:
        data_root: Folder that contains the dataset folders; created if missing.
        image_size: Side of the square images in pixels.

    Returns:
        The dataset folder, `data_root/digits`.

    Raises:
        ValueError: If `image_size` is not a positive int.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    dataset_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(data_root)))) / "digits"
    image_dir = dataset_dir / "images"
    split_path = dataset_dir / SPLIT_FILE

    if _is_complete(split_path, image_dir, image_size):
        logger.debug("Digits dataset at %s is complete; nothing to build.", dataset_dir)
        return dataset_dir

    # Imported here because scikit-learn takes about a second to import and is only needed
    # for building.
    from sklearn.datasets import load_digits

    logger.info("Building the digits dataset (%d images, %d px) at %s.",
                NUM_IMAGES, image_size, dataset_dir)
    digits = load_digits()
    paths_by_label: dict[int, list[str]] = {label: [] for label in range(len(DIGIT_NAMES))}
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(target)
        relative_path = f"{DIGIT_NAMES[label]}/{index:04d}.png"
        _write_png(image_dir / relative_path, pixels, image_size)
        paths_by_label[label].append(relative_path)

    write_json_atomic(split_path, _split_per_class(paths_by_label, random.Random(SPLIT_SEED)))
    return dataset_dir


def _split_per_class(paths_by_label: dict[int, list[str]],
                     rng: random.Random) -> dict[str, list[RawItem]]:
    splits: dict[str, list[RawItem]] = {split: [] for split in SPLIT_NAMES}
    for label in sorted(paths_by_label):
        paths = list(paths_by_label[label])
        rng.shuffle(paths)
        num_train = round(len(paths) * TRAIN_FRACTION)
        num_val = round(len(paths) * VAL_FRACTION)
        parts = {
            "train": paths[:num_train],
            "val": paths[num_train:num_train + num_val],
            "test": paths[num_train + num_val:],
        }
        for split, part in parts.items():
            splits[split].extend((path, label, DIGIT_NAMES[label]) for path in part)
    return splits


def _write_png(path: Path, pixels: np.ndarray, image_size: int) -> None:
    gray = np.rint(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray)  # 2-D uint8 -> mode "L"
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _is_complete(split_path: Path, image_dir: Path, image_size: int) -> bool:
    if not split_path.is_file():
        return False
    try:
        splits = load_split_json(split_path)
    except ValueError as error:
        logger.warning("Rebuilding the digits dataset because %s is invalid: %s", split_path, error)
        return False

    items = [item for split in SPLIT_NAMES for item in splits[split]]
    if len(items) != NUM_IMAGES or not all((image_dir / item[0]).is_file() for item in items):
        logger.info("Rebuilding the digits dataset because %s lists %d images or some are missing.",
                    split_path, len(items))
        return False

    with Image.open(image_dir / items[0][0]) as first:
        size = first.size
    if size != (image_size, image_size):
        logger.info("Rebuilding the digits dataset at %d px; the existing images are %dx%d px.",
                    image_size, *size)
        return False
    return True

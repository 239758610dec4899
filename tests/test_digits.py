"""Tests of the built-in digits dataset."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import DIGIT_NAMES, build_digits, read_dataset

# Per-class sizes of sklearn's digits (labels 0..9) and the CoOp 50/20/30 rule applied to
# them with Python's round(): train round(n / 2), val round(n / 5), test the rest.
CLASS_SIZES = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
TRAIN_SIZES = [89, 91, 88, 92, 90, 91, 90, 90, 87, 90]
VAL_SIZES = [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits_data")
    build_digits(root)
    return root


def test_digits_counts(digits_root: Path) -> None:
    split = json.loads((digits_root / "digits" / "split_zhou_Digits.json").read_text())
    images = sorted((digits_root / "digits" / "images").rglob("*.png"))

    assert len(images) == 1797
    folders = sorted(p.name for p in (digits_root / "digits" / "images").iterdir())
    assert folders == sorted(DIGIT_NAMES)
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 1797

    train = Counter(label for _, label, _ in split["train"])
    val = Counter(label for _, label, _ in split["val"])
    test = Counter(label for _, label, _ in split["test"])
    assert [train[c] for c in range(10)] == TRAIN_SIZES
    assert [val[c] for c in range(10)] == VAL_SIZES
    assert [test[c] for c in range(10)] == [
        n - t - v for n, t, v in zip(CLASS_SIZES, TRAIN_SIZES, VAL_SIZES, strict=True)
    ]


def test_digits_split_disjoint(digits_root: Path) -> None:
    split = json.loads((digits_root / "digits" / "split_zhou_Digits.json").read_text())
    paths = [path for part in ("train", "val", "test") for path, _, _ in split[part]]

    assert len(set(paths)) == 1797
    for path, label, classname in split["train"][:50]:
        assert path.startswith(f"{DIGIT_NAMES[label]}/")
        assert classname == DIGIT_NAMES[label]


def test_digits_images_are_rgb(digits_root: Path) -> None:
    with Image.open(digits_root / "digits" / "images" / "three" / "0003.png") as image:
        assert image.mode == "RGB"
        assert image.size == (32, 32)
        pixels = image.convert("L").getextrema()
    assert pixels[0] < 30
    assert pixels[1] > 200


def test_digits_read_like_coop(digits_root: Path) -> None:
    splits = read_dataset("digits", digits_root)

    assert splits.classnames == DIGIT_NAMES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (898, 359, 540)
    assert splits.template == "a photo of the digit {}."


def test_digits_idempotent(digits_root: Path) -> None:
    split_path = digits_root / "digits" / "split_zhou_Digits.json"
    image_path = digits_root / "digits" / "images" / "zero" / "0000.png"
    before = (split_path.stat().st_mtime_ns, image_path.stat().st_mtime_ns)

    assert build_digits(digits_root) == digits_root / "digits"

    assert (split_path.stat().st_mtime_ns, image_path.stat().st_mtime_ns) == before
    assert not list((digits_root / "digits").glob(".*.tmp"))


def test_digits_split_is_seeded(digits_root: Path, tmp_path: Path) -> None:
    build_digits(tmp_path, image_size=8)

    first = json.loads((digits_root / "digits" / "split_zhou_Digits.json").read_text())
    second = json.loads((tmp_path / "digits" / "split_zhou_Digits.json").read_text())
    assert first == second


def test_digits_rebuilds_incomplete(tmp_path: Path) -> None:
    build_digits(tmp_path, image_size=8)
    missing = tmp_path / "digits" / "images" / "five" / "0005.png"
    os.unlink(missing)

    build_digits(tmp_path, image_size=8)
    assert missing.is_file()

    build_digits(tmp_path, image_size=12)
    with Image.open(missing) as image:
        assert image.size == (12, 12)


@pytest.mark.parametrize("size", [0, -1, 3.5])
def test_digits_bad_size(tmp_path: Path, size: object) -> None:
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        build_digits(tmp_path, image_size=size)  # type: ignore[arg-type]

"""Tests of ImageListDataset on real image files, readable and broken."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from benchmarks import Datum, ImageListDataset, build_transform, read_dataset
from tests.fixtures.coop_layouts import make_dataset, save_image


@pytest.fixture
def broken_root(tmp_path: Path) -> Path:
    """Folder with good.jpg, good2.png, a truncated JPEG and a text file named like an image."""
    save_image(tmp_path / "good.jpg", 1, 0)
    save_image(tmp_path / "good2.png", 2, 0)
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    return tmp_path


def test_items_load_as_tensors(tmp_path: Path) -> None:
    make_dataset("dtd", tmp_path)
    splits = read_dataset("dtd", tmp_path)

    dataset = ImageListDataset(splits.test, splits.image_root, build_transform(16, train=False))
    image, label = dataset[4]

    assert len(dataset) == 15
    assert dataset.targets == [item.label for item in splits.test]
    assert image.shape == (3, 16, 16)
    assert label == splits.test[4].label


def test_no_transform_returns_rgb_image(broken_root: Path) -> None:
    dataset = ImageListDataset([Datum("good2.png", 3, "three")], broken_root, None)

    image, label = dataset[0]

    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert label == 3


def test_negative_index_and_range(broken_root: Path) -> None:
    dataset = ImageListDataset([Datum("good.jpg", 0, "a"), Datum("good2.png", 1, "b")],
                               broken_root, None)

    assert dataset[-1][1] == 1
    with pytest.raises(IndexError, match="out of range"):
        dataset[2]


@pytest.mark.parametrize(("name", "error_type"), [
    ("text.jpg", UnidentifiedImageError),
    ("truncated.jpg", OSError),
    ("missing.jpg", FileNotFoundError),
])
def test_unreadable_image_names_path(broken_root: Path, name: str,
                                     error_type: type[Exception]) -> None:
    dataset = ImageListDataset([Datum(name, 0, "zero")], broken_root, None)

    with pytest.raises(error_type) as excinfo:
        dataset[0]
    message = str(excinfo.value)
    assert str(broken_root / name) in message
    assert "on_error='skip'" in message


def test_skip_mode_returns_next_readable(broken_root: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    items = [
        Datum("good.jpg", 0, "zero"),
        Datum("text.jpg", 1, "one"),
        Datum("truncated.jpg", 2, "two"),
        Datum("good2.png", 3, "three"),
    ]
    dataset = ImageListDataset(items, broken_root, build_transform(8, train=False), "skip")

    with caplog.at_level(logging.WARNING, logger="benchmarks.imagelist"):
        image, label = dataset[1]
        again_image, again_label = dataset[2]

    assert label == 3
    assert again_label == 3
    assert image.shape == (3, 8, 8)
    assert torch.equal(image, again_image)
    assert dataset.skipped == {str(broken_root / "text.jpg"), str(broken_root / "truncated.jpg")}
    assert caplog.text.count("Skipping unreadable image") == 2
    assert dataset.targets == [0, 1, 2, 3]


def test_skip_mode_wraps_around(broken_root: Path) -> None:
    items = [Datum("good.jpg", 0, "zero"), Datum("text.jpg", 1, "one")]
    dataset = ImageListDataset(items, broken_root, None, "skip")

    assert dataset[1][1] == 0


def test_skip_mode_all_unreadable(broken_root: Path) -> None:
    dataset = ImageListDataset([Datum("text.jpg", 0, "zero")], broken_root, None, "skip")

    with pytest.raises(OSError, match="None of the 1 images"):
        dataset[0]


def test_bad_on_error_rejected(broken_root: Path) -> None:
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        ImageListDataset([], broken_root, None, "ignore")  # type: ignore[arg-type]


def test_dataset_pickles_and_batches(tmp_path: Path) -> None:
    make_dataset("eurosat", tmp_path)
    splits = read_dataset("eurosat", tmp_path)
    dataset = ImageListDataset(splits.train, splits.image_root, build_transform(12, train=True))

    restored = pickle.loads(pickle.dumps(dataset))
    images, labels = next(iter(DataLoader(restored, batch_size=6, shuffle=False)))

    assert images.shape == (6, 3, 12, 12)
    assert labels.tolist() == dataset.targets[:6]

"""Tests of base/novel class subsampling and the base-to-novel data preparation."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import (
    DatasetSplits,
    Datum,
    base2novel_splits,
    fewshot_splits,
    read_dataset,
    subsample_classes,
)
from tests.fixtures.coop_layouts import make_dataset


def _toy(num_classes: int, tmp_path: Path, per_split: int = 2) -> DatasetSplits:
    def items(split: str) -> tuple[Datum, ...]:
        return tuple(
            Datum(f"{split}/{label}_{i}.jpg", label, f"class {label}")
            for label in range(num_classes)
            for i in range(per_split)
        )

    return DatasetSplits(
        name="toy",
        image_root=tmp_path,
        train=items("train"),
        val=items("val"),
        test=items("test"),
        classnames=tuple(f"class {label}" for label in range(num_classes)),
        template="a photo of a {}.",
    )


@pytest.mark.parametrize(("num_classes", "num_base", "num_new"), [
    (2, 1, 1), (5, 3, 2), (10, 5, 5), (37, 19, 18), (47, 24, 23), (397, 199, 198),
])
def test_base_new_class_counts(tmp_path: Path, num_classes: int, num_base: int,
                               num_new: int) -> None:
    splits = _toy(num_classes, tmp_path, per_split=1)

    base = subsample_classes(splits, "base")
    new = subsample_classes(splits, "new")

    assert base.num_classes == num_base
    assert new.num_classes == num_new
    assert len(base.test) == num_base
    assert len(new.test) == num_new


def test_labels_remapped_in_all_splits(tmp_path: Path) -> None:
    splits = _toy(5, tmp_path)

    new = subsample_classes(splits, "new")

    assert new.classnames == ("class 3", "class 4")
    for split in (new.train, new.val, new.test):
        assert sorted({item.label for item in split}) == [0, 1]
        for item in split:
            assert item.classname == new.classnames[item.label]
    assert new.test[0] == Datum("test/3_0.jpg", 0, "class 3")
    assert new.template == splits.template
    assert new.image_root == splits.image_root


def test_base_keeps_lowest_labels(tmp_path: Path) -> None:
    splits = _toy(5, tmp_path)

    base = subsample_classes(splits, "base")

    assert base.classnames == ("class 0", "class 1", "class 2")
    assert [item.impath for item in base.val] == [item.impath for item in splits.val[:6]]


def test_classes_taken_from_train_labels(tmp_path: Path) -> None:
    splits = _toy(4, tmp_path)
    # Without label 0 in train, the sorted train labels are [1, 2, 3]: base is {1, 2}.
    no_zero = DatasetSplits(
        splits.name, splits.image_root, tuple(i for i in splits.train if i.label != 0),
        splits.val, splits.test, splits.classnames, splits.template,
    )

    base = subsample_classes(no_zero, "base")

    assert base.classnames == ("class 1", "class 2")
    assert {item.label for item in base.test} == {0, 1}


def test_test_only_uses_test_labels(tmp_path: Path) -> None:
    splits = _toy(5, tmp_path)
    test_only = DatasetSplits(splits.name, splits.image_root, (), (), splits.test,
                              splits.classnames, splits.template)

    assert subsample_classes(test_only, "base").num_classes == 3
    assert subsample_classes(test_only, "new").num_classes == 2


def test_all_is_identity(tmp_path: Path) -> None:
    splits = _toy(3, tmp_path)

    assert subsample_classes(splits, "all") is splits


@pytest.mark.parametrize("value", ["novel", "BASE", "", None])
def test_bad_subsample_rejected(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="subsample must be one of 'all', 'base', 'new'"):
        subsample_classes(_toy(3, tmp_path), value)  # type: ignore[arg-type]


def test_single_class_new_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least two classes"):
        subsample_classes(_toy(1, tmp_path), "new")


def test_base2novel_samples_before_split(tmp_path: Path) -> None:
    make_dataset("eurosat", tmp_path / "data", num_classes=5, per_class=(6, 5, 2))
    full = read_dataset("eurosat", tmp_path / "data")
    sampled = fewshot_splits(full, 4, 3, None)

    base, new = base2novel_splits("eurosat", tmp_path / "data", 4, 3, tmp_path / "cache")

    assert base.classnames == ("Annual Crop Land", "Forest", "Herbaceous Vegetation Land")
    assert new.classnames == ("Highway or Road", "Industrial Buildings")
    assert [i.impath for i in base.train] == [i.impath for i in sampled.train if i.label < 3]
    assert [i.impath for i in new.train] == [i.impath for i in sampled.train if i.label >= 3]
    assert [i.impath for i in new.val] == [i.impath for i in sampled.val if i.label >= 3]
    assert len(base.train) == 12
    assert len(new.val) == 8
    assert len(base.test) == 6
    assert len(new.test) == 4
    assert {i.label for i in new.test} == {0, 1}
    assert (tmp_path / "cache" / "eurosat").is_dir()


def test_base2novel_all_data(tmp_path: Path) -> None:
    make_dataset("oxford_pets", tmp_path, num_classes=37, per_class=(1, 1, 1))

    base, new = base2novel_splits("oxford_pets", tmp_path, None, 1, None)

    assert base.num_classes == 19
    assert new.num_classes == 18
    assert base.classnames[-1] == "keeshond"
    assert new.classnames[0] == "leonberger"
    assert len(new.test) == 18

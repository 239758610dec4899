"""Tests of CoOp few-shot sampling and its JSON cache."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest

import benchmarks.fewshot as fewshot_module
from benchmarks import (
    Datum,
    fewshot_cache_path,
    fewshot_splits,
    read_dataset,
    sample_fewshot,
    split_sha256,
)
from benchmarks.datasets import DatasetSplits
from tests.fixtures.coop_layouts import make_dataset


def _items(labels: list[int]) -> list[Datum]:
    return [Datum(f"img_{i:03d}.jpg", label, f"class {label}") for i, label in enumerate(labels)]


@pytest.fixture
def eurosat(tmp_path: Path) -> DatasetSplits:
    make_dataset("eurosat", tmp_path / "data", num_classes=5, per_class=(7, 6, 2))
    return read_dataset("eurosat", tmp_path / "data")


def _forbid_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampled although a cache file exists")

    monkeypatch.setattr(fewshot_module, "sample_fewshot", fail)


# ---------------------------------------------------------------------------------------------
# The sampling rule


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 12345])
def test_sample_matches_coop_reference(seed: int) -> None:
    # Labels appear in the order 2, 0, 1; label 1 has fewer items than the shots.
    labels = [2, 0, 2, 1, 0, 2, 0, 2, 0, 2, 1, 0, 2]
    items = _items(labels)
    group_2 = [item for item in items if item.label == 2]
    group_0 = [item for item in items if item.label == 0]
    group_1 = [item for item in items if item.label == 1]

    random.seed(seed)
    expected = random.sample(group_2, 4) + random.sample(group_0, 4) + group_1

    assert sample_fewshot(items, 4, random.Random(seed)) == expected


def test_sample_exact_group_size_draws() -> None:
    # A group of exactly `shots` items is sampled (shuffled), so it consumes randomness.
    items = _items([0, 0, 0, 1, 1, 1, 1])
    random.seed(5)
    expected = random.sample(items[:3], 3) + random.sample(items[3:], 3)

    assert sample_fewshot(items, 3, random.Random(5)) == expected


def test_sample_small_group_draws_nothing() -> None:
    items = _items([0, 1, 1, 1])
    rng = random.Random(9)
    reference = random.Random(9)

    sampled = sample_fewshot(items, 2, rng)

    assert sampled[0] == items[0]
    assert sampled[1:] == reference.sample(items[1:], 2)
    assert rng.getstate() == reference.getstate()


@pytest.mark.parametrize("shots", [0, -1, True, 2.0, "4"])
def test_sample_rejects_bad_shots(shots: object) -> None:
    with pytest.raises(ValueError, match="shots must be an int >= 1"):
        sample_fewshot(_items([0, 1]), shots, random.Random(0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# fewshot_splits


def test_fewshot_train_then_val_stream(eurosat: DatasetSplits) -> None:
    def groups(items: tuple[Datum, ...]) -> list[list[Datum]]:
        by_label: dict[int, list[Datum]] = {}
        for item in items:
            by_label.setdefault(item.label, []).append(item)
        return list(by_label.values())

    random.seed(1)
    expected_train = [x for group in groups(eurosat.train) for x in random.sample(group, 5)]
    expected_val = [x for group in groups(eurosat.val) for x in random.sample(group, 4)]

    result = fewshot_splits(eurosat, 5, 1, None)

    assert list(result.train) == expected_train
    assert list(result.val) == expected_val
    assert result.test == eurosat.test
    assert result.classnames == eurosat.classnames


@pytest.mark.parametrize(("shots", "val_per_class"), [(1, 1), (2, 2), (4, 4), (16, 4)])
def test_fewshot_val_gets_min_shots_4(eurosat: DatasetSplits, shots: int,
                                      val_per_class: int) -> None:
    result = fewshot_splits(eurosat, shots, 0, None)

    train_counts = [sum(item.label == c for item in result.train) for c in range(5)]
    val_counts = [sum(item.label == c for item in result.val) for c in range(5)]
    assert train_counts == [min(shots, 7)] * 5
    assert val_counts == [val_per_class] * 5


def test_fewshot_deterministic_per_seed(eurosat: DatasetSplits) -> None:
    first = fewshot_splits(eurosat, 2, 7, None)
    again = fewshot_splits(eurosat, 2, 7, None)
    other = fewshot_splits(eurosat, 2, 8, None)

    assert first.train == again.train
    assert first.val == again.val
    assert first.train != other.train


def test_fewshot_seed_zero_is_a_seed(eurosat: DatasetSplits) -> None:
    zero = fewshot_splits(eurosat, 2, 0, None)

    random.seed(0)
    first_group = [item for item in eurosat.train if item.label == 0]
    assert list(zero.train[:2]) == random.sample(first_group, 2)
    with pytest.raises(ValueError, match="seed is None"):
        fewshot_splits(eurosat, 2, None, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        fewshot_splits(eurosat, 2, "1", None)  # type: ignore[arg-type]


def test_fewshot_leaves_global_random_alone(eurosat: DatasetSplits) -> None:
    random.seed(123)
    expected = random.random()

    random.seed(123)
    fewshot_splits(eurosat, 2, 1, None)

    assert random.random() == expected


def test_fewshot_none_keeps_everything(eurosat: DatasetSplits) -> None:
    assert fewshot_splits(eurosat, None, 1, None) is eurosat


@pytest.mark.parametrize("shots", [0, -4])
def test_fewshot_rejects_bad_shots(eurosat: DatasetSplits, shots: int) -> None:
    with pytest.raises(ValueError, match="pass shots=None"):
        fewshot_splits(eurosat, shots, 1, None)


def test_fewshot_imagenet_keeps_val(tmp_path: Path) -> None:
    make_dataset("imagenet", tmp_path / "data", per_class=(5, 0, 3))
    imagenet = read_dataset("imagenet", tmp_path / "data")

    result = fewshot_splits(imagenet, 2, 1, tmp_path / "cache")
    cached = fewshot_splits(imagenet, 2, 1, tmp_path / "cache")

    assert len(result.train) == 10
    assert result.val == imagenet.test
    assert result.test == imagenet.test
    assert cached == result
    payload = json.loads(next((tmp_path / "cache" / "imagenet").glob("*.json")).read_text())
    assert payload["val"] is None


def test_fewshot_test_only_unchanged(tmp_path: Path) -> None:
    make_dataset("imagenet_a", tmp_path)
    splits = read_dataset("imagenet_a", tmp_path)

    assert fewshot_splits(splits, 4, 1, tmp_path / "cache") is splits
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_round_trip(eurosat: DatasetSplits, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    sampled = fewshot_splits(eurosat, 3, 2, cache_dir)

    path = fewshot_cache_path(cache_dir, "eurosat", 3, 2, split_sha256(eurosat))
    assert path.parent == cache_dir / "eurosat"
    assert path.name.startswith("shot_3-seed_2-split_")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    payload = json.loads(path.read_text())
    assert payload["split_sha256"] == split_sha256(eurosat)
    assert payload["classnames"] == list(eurosat.classnames)
    assert payload["train"][0] == [sampled.train[0].impath, sampled.train[0].label,
                                   sampled.train[0].classname]
    assert not any(Path(entry[0]).is_absolute() for entry in payload["train"] + payload["val"])

    _forbid_sampling(monkeypatch)
    loaded = fewshot_splits(eurosat, 3, 2, cache_dir)

    assert loaded == sampled


def test_cache_survives_moving_data(eurosat: DatasetSplits, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    sampled = fewshot_splits(eurosat, 3, 2, cache_dir)
    shutil.move(tmp_path / "data", tmp_path / "moved")
    moved = read_dataset("eurosat", tmp_path / "moved")

    _forbid_sampling(monkeypatch)
    loaded = fewshot_splits(moved, 3, 2, cache_dir)

    assert loaded.train == sampled.train
    assert loaded.image_root == tmp_path / "moved" / "eurosat" / "2750"


def test_cache_keys_differ(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fewshot_splits(eurosat, 3, 2, cache_dir)
    fewshot_splits(eurosat, 3, 0, cache_dir)
    fewshot_splits(eurosat, 1, 2, cache_dir)
    fewer = dataclasses.replace(eurosat, test=eurosat.test[:-1])
    fewshot_splits(fewer, 3, 2, cache_dir)

    names = sorted(p.name for p in (cache_dir / "eurosat").iterdir())
    assert len(names) == 4
    assert all(name.endswith(".json") for name in names)


def test_cache_stale_classnames_rejected(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fewshot_splits(eurosat, 3, 2, cache_dir)

    def rename(item: Datum) -> Datum:
        return dataclasses.replace(item, classname="Highway") if item.label == 3 else item

    renamed = dataclasses.replace(
        eurosat,
        train=tuple(map(rename, eurosat.train)),
        val=tuple(map(rename, eurosat.val)),
        test=tuple(map(rename, eurosat.test)),
        classnames=eurosat.classnames[:3] + ("Highway",) + eurosat.classnames[4:],
    )

    with pytest.raises(ValueError, match="stale") as excinfo:
        fewshot_splits(renamed, 3, 2, cache_dir)
    message = str(excinfo.value)
    assert "label 3: 'Highway or Road' in the cache, 'Highway' in the dataset" in message
    assert str(cache_dir / "eurosat") in message


def test_cache_edited_classnames_rejected(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fewshot_splits(eurosat, 3, 2, cache_dir)
    path = fewshot_cache_path(cache_dir, "eurosat", 3, 2, split_sha256(eurosat))
    payload = json.loads(path.read_text())
    payload["classnames"] = payload["classnames"][:-1]
    path.write_text(json.dumps(payload))

    with pytest.raises(ValueError, match="the cache has 4 classes, the dataset 5"):
        fewshot_splits(eurosat, 3, 2, cache_dir)


def test_cache_bad_item_rejected(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fewshot_splits(eurosat, 3, 2, cache_dir)
    path = fewshot_cache_path(cache_dir, "eurosat", 3, 2, split_sha256(eurosat))
    payload = json.loads(path.read_text())
    payload["train"][0][1] = 99
    path.write_text(json.dumps(payload))

    with pytest.raises(ValueError, match="item 0 of 'train'"):
        fewshot_splits(eurosat, 3, 2, cache_dir)


def test_cache_corrupt_file_rejected(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    path = fewshot_cache_path(cache_dir, "eurosat", 3, 2, split_sha256(eurosat))
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "train": [')

    with pytest.raises(ValueError, match="is not valid JSON") as excinfo:
        fewshot_splits(eurosat, 3, 2, cache_dir)
    assert f"Delete {path}" in str(excinfo.value)


def test_cache_hash_mismatch_rejected(eurosat: DatasetSplits, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fewshot_splits(eurosat, 3, 2, cache_dir)
    path = fewshot_cache_path(cache_dir, "eurosat", 3, 2, split_sha256(eurosat))
    payload = json.loads(path.read_text())
    payload["split_sha256"] = payload["split_sha256"][:12] + "0" * 52
    path.write_text(json.dumps(payload))

    with pytest.raises(ValueError, match="split_sha256="):
        fewshot_splits(eurosat, 3, 2, cache_dir)


def test_split_hash_ignores_classnames(eurosat: DatasetSplits) -> None:
    renamed = dataclasses.replace(eurosat, classnames=tuple(n.upper() for n in eurosat.classnames))
    relabelled = dataclasses.replace(
        eurosat, test=tuple(dataclasses.replace(item, label=0) for item in eurosat.test)
    )

    assert split_sha256(renamed) == split_sha256(eurosat)
    assert split_sha256(relabelled) != split_sha256(eurosat)

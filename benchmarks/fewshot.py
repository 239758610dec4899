"""Few-shot sampling with the CoOp rule, and a JSON cache of the sampled lists.

CoOp seeds Python's `random` with the run seed, then samples K train images per class and
min(K, 4) val images per class from that one stream, in that order. `fewshot_splits` replays
this with a private `random.Random(seed)`, so the same seed on the same split lists gives the
same images as CoOp's JSON-split datasets, without touching the global random state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._io import write_json_atomic
from benchmarks.datasets import DATASETS, DatasetSplits, Datum

logger = logging.getLogger(__name__)

MAX_VAL_SHOTS = 4
"""Val images per class in few-shot runs are min(shots, MAX_VAL_SHOTS), as in CoOp."""

CACHE_FORMAT = 1
"""Version of the cache file layout; files with another version are rejected."""


def _check_shots(shots: object) -> int:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(
            f"shots must be an int >= 1, got {shots!r}. To keep all images, pass shots=None to "
            "fewshot_splits instead of sampling."
        )
    return shots


def _check_seed(seed: object) -> int:
    if seed is None:
        raise ValueError("seed is None, but few-shot sampling needs an int seed (0 is valid), "
                         "so that the sample can be reproduced and cached.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} of type {type(seed).__name__}.")
    return seed


def sample_fewshot(items: Sequence[Datum], shots: int, rng: random.Random) -> list[Datum]:
    """Sample `shots` items per class with the CoOp rule.

    Items are grouped by label in order of first appearance. A group with at least `shots`
    items contributes `rng.sample(group, shots)`; a smaller group contributes all its items and
    draws nothing from `rng`. The output keeps the group order.

    Args:
        items: Items to sample from; their order decides the sample for a given `rng` state.
        shots: Items per class, >= 1.
        rng: Random stream to draw from; it is advanced.

    Returns:
        The sampled items.

    Raises:
        ValueError: If `shots` is not an int >= 1.
    """
    _check_shots(shots)
    groups: dict[int, list[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)

    sampled: list[Datum] = []
    for group in groups.values():
        if len(group) >= shots:
            sampled.extend(rng.sample(group, shots))
        else:
            sampled.extend(group)
    return sampled


def split_sha256(splits: DatasetSplits) -> str:
    """Hash the image paths and labels of the train, val and test lists.

    Class names are left out on purpose: a cache whose lists still match but whose class
    names differ is reported as stale by `fewshot_splits` instead of being silently ignored.

    Returns:
        The hex SHA-256 digest.
    """
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        digest.update(f"[{split}]\n".encode())
        for item in getattr(splits, split):
            digest.update(f"{item.impath}\t{item.label}\n".encode())
    return digest.hexdigest()


def fewshot_cache_path(cache_dir: str | os.PathLike[str], name: str, shots: int, seed: int,
                       split_digest: str) -> Path:
    """Return `<cache_dir>/<name>/shot_<shots>-seed_<seed>-split_<first 12 hex of digest>.json`."""
    file_name = f"shot_{shots}-seed_{seed}-split_{split_digest[:12]}.json"
    return Path(cache_dir).expanduser() / name / file_name


def fewshot_splits(splits: DatasetSplits, shots: int | None, seed: int,
                   cache_dir: str | os.PathLike[str] | None = None) -> DatasetSplits:
    """Sample the few-shot train and val lists of a dataset, with the CoOp rule.

    With `random.Random(seed)`, train is sampled with `shots` per class and then val with
    min(shots, 4) per class, from the same stream. ImageNet, whose val list is its test list,
    keeps its full val list. Test-only datasets (no train and no val items) are returned
    unchanged.

    With a `cache_dir`, the sample is stored as JSON (relative paths, labels, class names, the
    split hash) at `fewshot_cache_path(...)` and read back on later calls. The file name contains
    a short hash of the split lists, so changed lists get a new file.

    Args:
        splits: Output of `read_dataset`.
        shots: Images per class, >= 1, or None to return `splits` unchanged.
        seed: Seed of the sample; any int, 0 included.
        cache_dir: Folder of the cache, or None for no cache.

    Returns:
        The splits with the sampled train and val lists; test is unchanged.

    Raises:
        ValueError: If `shots` is not None or an int >= 1; if `seed` is None while sampling; or
            if a cache file is malformed or stale (its class names differ from the dataset's).
        TypeError: If `seed` is not an int.
    """
    if shots is None:
        return splits
    _check_shots(shots)
    _check_seed(seed)
    if not splits.train and not splits.val:
        logger.info("Dataset %r has no train or val images; nothing to sample.", splits.name)
        return splits

    info = DATASETS.get(splits.name)
    keep_val = info is not None and info.val_is_test
    digest = split_sha256(splits)

    cache_path = None
    if cache_dir is not None:
        cache_path = fewshot_cache_path(cache_dir, splits.name, shots, seed, digest)
        if cache_path.is_file():
            train, val = _load_cache(cache_path, splits, shots, seed, digest, keep_val)
            logger.info("Loaded the %d-shot sample of %r (seed %d) from %s.",
                        shots, splits.name, seed, cache_path)
            return dataclasses.replace(splits, train=train, val=val)

    rng = random.Random(seed)
    train = tuple(sample_fewshot(splits.train, shots, rng))
    if keep_val:
        val = splits.val
    else:
        val = tuple(sample_fewshot(splits.val, min(shots, MAX_VAL_SHOTS), rng))

    if cache_path is not None:
        _write_cache(cache_path, splits, shots, seed, digest, train, None if keep_val else val)
        logger.info("Saved the %d-shot sample of %r (seed %d) to %s.",
                    shots, splits.name, seed, cache_path)
    return dataclasses.replace(splits, train=train, val=val)


def _write_cache(path: Path, splits: DatasetSplits, shots: int, seed: int, digest: str,
                 train: Sequence[Datum], val: Sequence[Datum] | None) -> None:
    def encode(items: Sequence[Datum]) -> list[list[Any]]:
        return [[item.impath, item.label, item.classname] for item in items]

    payload = {
        "format": CACHE_FORMAT,
        "dataset": splits.name,
        "shots": shots,
        "seed": seed,
        "split_sha256": digest,
        "classnames": list(splits.classnames),
        "train": encode(train),
        "val": None if val is None else encode(val),
    }
    write_json_atomic(path, payload)


def _load_cache(path: Path, splits: DatasetSplits, shots: int, seed: int, digest: str,
                keep_val: bool) -> tuple[tuple[Datum, ...], tuple[Datum, ...]]:
    fix = f"Delete {path} to sample again."
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Few-shot cache {path} is not valid JSON ({error}). {fix}") from error
    if not isinstance(payload, dict):
        raise ValueError(f"Few-shot cache {path} is not a JSON object. {fix}")

    expected = {"format": CACHE_FORMAT, "dataset": splits.name, "shots": shots, "seed": seed,
                "split_sha256": digest}
    for key, value in expected.items():
        if payload.get(key) != value:
            raise ValueError(
                f"Few-shot cache {path} has {key}={payload.get(key)!r}, expected {value!r}. {fix}"
            )

    cached_names = payload.get("classnames")
    if cached_names != list(splits.classnames):
        raise ValueError(_classname_mismatch(path, cached_names, splits))

    train = _decode_items(payload.get("train"), path, "train", splits.classnames)
    if keep_val:
        if payload.get("val") is not None:
            raise ValueError(f"Few-shot cache {path} has a val list, but {splits.name!r} keeps "
                             f"its full val list. {fix}")
        return train, splits.val
    return train, _decode_items(payload.get("val"), path, "val", splits.classnames)


def _classname_mismatch(path: Path, cached: object, splits: DatasetSplits) -> str:
    prefix = (f"Few-shot cache {path} is stale: its class names differ from those of dataset "
              f"{splits.name!r}")
    suffix = (f"Delete {path} to sample again; the split lists are unchanged, so the same seed "
              "samples the same images with the current class names.")
    if not isinstance(cached, list):
        return f"{prefix} (the cache has {cached!r}). {suffix}"
    if len(cached) != len(splits.classnames):
        return (f"{prefix} (the cache has {len(cached)} classes, the dataset "
                f"{len(splits.classnames)}). {suffix}")
    differences = [
        f"label {label}: {old!r} in the cache, {new!r} in the dataset"
        for label, (old, new) in enumerate(zip(cached, splits.classnames, strict=True))
        if old != new
    ]
    return f"{prefix}: {'; '.join(differences[:5])}. {suffix}"


def _decode_items(entries: object, path: Path, split: str,
                  classnames: Sequence[str]) -> tuple[Datum, ...]:
    if not isinstance(entries, list):
        raise ValueError(f"Few-shot cache {path}: {split!r} is {type(entries).__name__}, "
                         f"expected a list. Delete {path} to sample again.")
    items = []
    for index, entry in enumerate(entries):
        valid = (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and type(entry[1]) is int
            and 0 <= entry[1] < len(classnames)
            and entry[2] == classnames[entry[1]]
        )
        if not valid:
            raise ValueError(
                f"Few-shot cache {path}: item {index} of {split!r} is {entry!r}; expected "
                f"[impath, label, classname] with a label in 0..{len(classnames) - 1} and its "
                f"class name. Delete {path} to sample again."
            )
        items.append(Datum(entry[0], entry[1], entry[2]))
    return tuple(items)

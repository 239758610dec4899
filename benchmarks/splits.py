"""Base/novel class splits of the CoOp base-to-novel protocol."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Literal, get_args

from benchmarks.datasets import DatasetSplits, Datum

Subsample = Literal["all", "base", "new"]
SUBSAMPLE_CHOICES: tuple[str, ...] = get_args(Subsample)


def subsample_classes(splits: DatasetSplits, subsample: Subsample) -> DatasetSplits:
    """Keep the base or the novel half of the classes, with labels renumbered from 0.

    The classes are the sorted labels of the train list, or of the test list for test-only
    datasets. With n classes, "base" keeps the first ceil(n / 2) and "new" the rest. Train, val
    and test are filtered alike and their labels are mapped to 0..k-1 in the same order, so a
    base or novel run builds its classifier from its own class names only.

    Args:
        splits: Splits to subsample, usually after few-shot sampling.
        subsample: "all" returns `splits` unchanged, "base" or "new" selects a half.

    Returns:
        The subsampled splits.

    Raises:
        ValueError: If `subsample` is not one of "all", "base", "new", if the splits have no
            items to take classes from, or if the selected half is empty (a single class).
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(
            f"subsample must be one of {', '.join(map(repr, SUBSAMPLE_CHOICES))}, got "
            f"{subsample!r}."
        )
    if subsample == "all":
        return splits

    source = splits.train if splits.train else splits.test
    labels = sorted({item.label for item in source})
    if not labels:
        raise ValueError(f"Dataset {splits.name!r} has no train or test items to subsample.")
    cut = math.ceil(len(labels) / 2)
    selected = labels[:cut] if subsample == "base" else labels[cut:]
    if not selected:
        raise ValueError(
            f"Dataset {splits.name!r} has {len(labels)} class, so the {subsample!r} half is "
            "empty; base/novel splits need at least two classes."
        )

    new_label = {old: new for new, old in enumerate(selected)}
    return dataclasses.replace(
        splits,
        train=_relabel(splits.train, new_label),
        val=_relabel(splits.val, new_label),
        test=_relabel(splits.test, new_label),
        classnames=tuple(splits.classnames[old] for old in selected),
    )


def _relabel(items: Iterable[Datum], new_label: dict[int, int]) -> tuple[Datum, ...]:
    return tuple(
        Datum(item.impath, new_label[item.label], item.classname)
        for item in items
        if item.label in new_label
    )

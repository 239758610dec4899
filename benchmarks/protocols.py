"""Dataset preparation for the evaluation protocols of the CoOp family."""

from __future__ import annotations

import os

from benchmarks.datasets import DatasetSplits, read_dataset
from benchmarks.fewshot import fewshot_splits
from benchmarks.splits import subsample_classes


def base2novel_splits(name: str, data_root: str | os.PathLike[str], shots: int | None,
                      seed: int, cache_dir: str | os.PathLike[str] | None = None,
                      ) -> tuple[DatasetSplits, DatasetSplits]:
    """Read a dataset and split it into its base and novel halves for base-to-novel runs.

    The few-shot sample is drawn before the class split, on all classes, as CoOp does, so the
    base and novel lists of a seed are the halves of one sample.

    Args:
        name: Registry name of the dataset.
        data_root: Folder that contains the dataset folders.
        shots: Images per class, or None for all images.
        seed: Seed of the few-shot sample.
        cache_dir: Folder of the few-shot cache, or None for no cache.

    Returns:
        (base, new): each with its own class names and labels 0..k-1. Train on base, then
        evaluate on the test split of each.

    Raises:
        ValueError, FileNotFoundError: As raised by `read_dataset`, `fewshot_splits` and
            `subsample_classes`.
    """
    splits = fewshot_splits(read_dataset(name, data_root), shots, seed, cache_dir)
    return subsample_classes(splits, "base"), subsample_classes(splits, "new")

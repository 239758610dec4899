"""Avalanche streams built from the dataset readers.

The paper protocols train on a one-experience stream and evaluate each class set as its own
one-experience stream; continual streams put several experiences in sequence.
"""

from __future__ import annotations

from typing import Sequence

from avalanche.benchmarks import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from torch.utils.data import Dataset


def make_stream(datasets: Sequence[Dataset], name: str = "train"):
    """One experience per dataset, in order. Each dataset must expose ``targets``."""
    for dataset in datasets:
        if not hasattr(dataset, "targets"):
            raise TypeError(f"{type(dataset).__name__} has no 'targets' attribute; Avalanche needs the labels")
    scenario = benchmark_from_datasets(**{name: [as_classification_dataset(d) for d in datasets]})
    return getattr(scenario, f"{name}_stream")


def make_experience(dataset: Dataset):
    """A single Avalanche experience over ``dataset``."""
    return make_stream([dataset])[0]

"""Data layer of vlprompt: dataset readers, few-shot and base/novel splits, image loading.

This package does not import model or training code. It yields image paths, labels, class names
and prompt templates.
"""

from benchmarks.datasets import (
    DATA_ROOT_ENV,
    DATASETS,
    STANDARD_DATASETS,
    DatasetInfo,
    DatasetSplits,
    Datum,
    dataset_info,
    default_data_root,
    list_datasets,
    read_dataset,
)
from benchmarks.digits import DIGIT_NAMES, build_digits
from benchmarks.fewshot import fewshot_cache_path, fewshot_splits, sample_fewshot, split_sha256
from benchmarks.imagelist import ImageListDataset
from benchmarks.protocols import base2novel_splits
from benchmarks.splits import subsample_classes
from benchmarks.transforms import CLIP_MEAN, CLIP_STD, build_transform
from benchmarks import torchvision_formats  # noqa: E402,F401  registers cifar100 and mnist  isort: skip

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DATA_ROOT_ENV",
    "DIGIT_NAMES",
    "STANDARD_DATASETS",
    "DatasetInfo",
    "DatasetSplits",
    "Datum",
    "ImageListDataset",
    "base2novel_splits",
    "build_digits",
    "build_transform",
    "dataset_info",
    "default_data_root",
    "fewshot_cache_path",
    "fewshot_splits",
    "list_datasets",
    "read_dataset",
    "sample_fewshot",
    "split_sha256",
    "subsample_classes",
]

"""Continual-learning streams built from the dataset readers, as Avalanche benchmarks.

A stream is a sequence of tasks. Each task has a training list, a test list and its own classes.
The stream also states, for every evaluation point, which test sets are evaluated and on which
classes:

- ``datasets``: one task per dataset, in the given order. Task identity is known: each test set
  is scored on its own dataset's classes.
- ``mtil``: the MTIL protocol of ZSCL (https://arxiv.org/abs/2303.06628): 11 datasets in Order I
  or Order II, task identity known as in ``datasets``.
- ``class-incremental``: the classes of one dataset, shuffled by a seeded class order and split
  into steps. The test images of every step seen so far are scored on the union of the classes
  seen so far.
- ``base-novel``: the base half of a dataset's classes, then the novel half, each scored on its
  own classes (the base-to-novel split of the CoOp protocols, learned in sequence).

Evaluation point 0 is the model before any training (the zero-shot row). Point p >= 1 follows the
training of task p - 1. In ``class-incremental`` streams point 0 scores only the first step's test
set, on the first step's classes, and point p the steps 1..p on the union of their classes.

Split convention of ``mtil``: the CoOp ``split_zhou`` train and test lists for the nine CoOp
datasets (the convention of DIKI and RAIL; Caltech101 then has 100 classes) and the official
train/test split for CIFAR-100 and MNIST. ZSCL and MoE-Adapters instead split Caltech101, EuroSAT
and SUN397 80/20 at random, so their numbers come from other test sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np

from benchmarks import torchvision_formats  # noqa: F401  registers cifar100 and mnist
from benchmarks.datasets import STANDARD_DATASETS, DatasetSplits, Datum, dataset_info, read_dataset
from benchmarks.fewshot import fewshot_splits
from benchmarks.imagelist import ImageListDataset, OnError
from benchmarks.splits import subsample_classes
from benchmarks.transforms import build_transform

logger = logging.getLogger(__name__)

STREAMS: tuple[str, ...] = ("datasets", "mtil", "class-incremental", "base-novel")

MTIL_ORDER_I: tuple[str, ...] = (
    "fgvc_aircraft", "caltech101", "cifar100", "dtd", "eurosat", "oxford_flowers", "food101",
    "mnist", "oxford_pets", "stanford_cars", "sun397",
)
"""MTIL Order I (alphabetical by ZSCL's dataset names)."""

MTIL_ORDER_II_PERMUTATION: tuple[int, ...] = (9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2)
"""Order II as indices into Order I, as ZSCL's results notebook builds it."""

MTIL_ORDERS: dict[int, tuple[str, ...]] = {
    1: MTIL_ORDER_I,
    2: tuple(MTIL_ORDER_I[i] for i in MTIL_ORDER_II_PERMUTATION),
}

DEFAULT_CLASS_ORDER_SEED = 1993
"""Seed of the class order of ``class-incremental``: numpy's ``RandomState(1993).permutation``,
the iCaRL convention that PyCIL and PROOF use."""

TrainClasses = Literal["current", "seen"]


@dataclass(frozen=True)
class LabelSpace:
    """Classes a learner scores at one moment, as plain data (``learners.ClassSet`` fields)."""

    classnames: tuple[str, ...]
    template: str
    dataset: str | None


@dataclass(frozen=True)
class ContinualTask:
    """One experience of a stream.

    Attributes:
        name: short display name, e.g. ``"eurosat"`` or ``"cifar100 step 2"``.
        dataset: registry name of the dataset the images come from.
        image_root: folder that every ``Datum.impath`` of ``train`` and ``test`` is relative to.
        train: training images, labelled in the space of ``train_classes``.
        test: test images, labelled in the space of every evaluation label space that scores them.
        classes: the task's own classes.
        train_classes: the classes training scores on (``classes``, or for ``class-incremental``
            with ``train_classes="seen"`` the union of the classes seen so far).
    """

    name: str
    dataset: str
    image_root: Path
    train: tuple[Datum, ...]
    test: tuple[Datum, ...]
    classes: LabelSpace
    train_classes: LabelSpace


@dataclass(frozen=True)
class ContinualStream:
    """A sequence of tasks and the rule that picks the classes of every evaluation.

    Attributes:
        kind: one of ``STREAMS``.
        label: run label used in output paths and summaries, e.g. ``"mtil-order1-full"``.
        tasks: the experiences, in training order.
        task_aware: True when each test set is scored on its own task's classes; False when the
            test sets seen so far are scored on the union of the classes seen so far.
        order: the task order number (1 or 2) where the stream has named orders, else None.
        shots: training images per class, or None for the full training lists.
        class_order: for ``class-incremental``, the original labels in the order they arrive.
        split_convention: one sentence on where the train and test lists come from.
    """

    kind: str
    label: str
    tasks: tuple[ContinualTask, ...]
    task_aware: bool
    order: int | None = None
    shots: int | None = None
    class_order: tuple[int, ...] | None = None
    split_convention: str = ""

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def eval_columns(self, point: int) -> list[int]:
        """Tasks whose test sets are evaluated at ``point`` (0 = before any training)."""
        if self.task_aware:
            return list(range(len(self.tasks)))
        return list(range(max(point, 1)))

    def eval_classes(self, point: int, column: int) -> LabelSpace:
        """Classes that the test set of task ``column`` is scored on at ``point``."""
        if self.task_aware:
            return self.tasks[column].classes
        if column >= max(point, 1):
            raise ValueError(f"task {column} is not evaluated at point {point} of a {self.kind} stream")
        return self.seen_classes(max(point, 1) - 1)

    def seen_classes(self, last_task: int) -> LabelSpace:
        """Union of the classes of tasks ``0..last_task``, in arrival order."""
        first = self.tasks[0].classes
        names = tuple(name for task in self.tasks[: last_task + 1] for name in task.classes.classnames)
        return LabelSpace(names, first.template, first.dataset)

    def build_benchmark(self, image_size: int, on_error: OnError = "raise") -> ContinualBenchmark:
        """Build the Avalanche benchmark: train and test streams with task label i for task i.

        Every sample is ``(image, label, task label)``. Train images get the augmenting train
        transform, test images the test transform.
        """
        from avalanche.benchmarks import benchmark_from_datasets, task_incremental_benchmark
        from avalanche.benchmarks.utils import as_classification_dataset

        test_transform = build_transform(image_size, train=False)
        train = [
            ImageListDataset(t.train, t.image_root, build_transform(image_size, train=True, dataset=t.dataset), on_error)
            for t in self.tasks
        ]
        test = [ImageListDataset(t.test, t.image_root, test_transform, on_error) for t in self.tasks]
        scenario = benchmark_from_datasets(
            train=[as_classification_dataset(d) for d in train],
            test=[as_classification_dataset(d) for d in test],
        )
        return ContinualBenchmark(task_incremental_benchmark(scenario), tuple(train), tuple(test))


class ContinualBenchmark(NamedTuple):
    """An Avalanche scenario with the image datasets behind its experiences."""

    scenario: Any
    """Avalanche ``CLScenario`` with ``train_stream`` and ``test_stream``."""
    train_sets: tuple[ImageListDataset, ...]
    test_sets: tuple[ImageListDataset, ...]

    def skipped_images(self) -> list[str]:
        """Paths of the unreadable images skipped so far (``on_error="skip"``)."""
        return sorted(set().union(*(d.skipped for d in (*self.train_sets, *self.test_sets))))


# ---------------------------------------------------------------------------------------------
# Builders


def _label_space(splits: DatasetSplits) -> LabelSpace:
    return LabelSpace(tuple(splits.classnames), splits.template, splits.name)


def _task_from_splits(splits: DatasetSplits, name: str | None = None) -> ContinualTask:
    if not splits.train:
        raise ValueError(f"dataset {splits.name!r} has no training images; continual streams need a train split")
    if not splits.test:
        raise ValueError(f"dataset {splits.name!r} has no test images to evaluate")
    classes = _label_space(splits)
    return ContinualTask(name or splits.name, splits.name, splits.image_root, splits.train, splits.test, classes, classes)


def _read(name: str, data_root: str | os.PathLike, shots: int | None, seed: int,
          cache_dir: str | os.PathLike | None) -> DatasetSplits:
    info = dataset_info(name)
    if info.test_only:
        raise ValueError(f"dataset {name!r} has a test split only and cannot be a training task")
    return fewshot_splits(read_dataset(name, data_root), shots, seed, cache_dir)


def _shots_label(shots: int | None) -> str:
    return "full" if shots is None else f"{shots}shot"


def expand_dataset_names(names: Sequence[str]) -> list[str]:
    """Split comma-separated names, expand ``all`` to the 11 CoOp datasets, keep the order.

    Raises:
        ValueError: if no name is left or one appears twice.
    """
    expanded: list[str] = []
    for value in names:
        for name in value.split(","):
            name = name.strip()
            if name == "all":
                expanded.extend(STANDARD_DATASETS)
            elif name:
                expanded.append(name)
    if not expanded:
        raise ValueError("no datasets given; pass --datasets all or an ordered list such as eurosat,dtd")
    repeated = sorted({name for name in expanded if expanded.count(name) > 1})
    if repeated:
        raise ValueError(f"datasets {repeated} appear twice in {expanded}; each dataset can be one task only")
    return expanded


def datasets_label(names: Sequence[str], order: int, shots: int | None) -> str:
    """Run label of a ``datasets`` stream; long lists are named by count and a hash of the order."""
    names = expand_dataset_names(names)
    if sorted(names) == sorted(STANDARD_DATASETS):
        tasks = "coop11"
    elif len(names) <= 4:
        tasks = "+".join(names)
    else:
        tasks = f"{len(names)}tasks-{hashlib.sha1(','.join(names).encode()).hexdigest()[:8]}"
    return f"datasets-{tasks}-order{order}-{_shots_label(shots)}"


def datasets_stream(names: Sequence[str], data_root: str | os.PathLike, *, order: int = 1,
                    shots: int | None = 16, seed: int = 1,
                    cache_dir: str | os.PathLike | None = None) -> ContinualStream:
    """One task per dataset, task identity known.

    Args:
        names: dataset names in training order (``all`` expands to the 11 CoOp datasets).
        order: 1 keeps the given order, 2 reverses it.
        shots: training images per class, None for the full training lists.
        seed: seed of the few-shot samples.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (as listed) or 2 (reversed) for the datasets stream, got {order!r}")
    names = expand_dataset_names(names)
    label = datasets_label(names, order, shots)
    if order == 2:
        names.reverse()
    tasks = tuple(_task_from_splits(_read(name, data_root, shots, seed, cache_dir)) for name in names)
    return ContinualStream(
        kind="datasets",
        label=label,
        tasks=tasks,
        task_aware=True,
        order=order,
        shots=shots,
        split_convention="train and test lists of each dataset's reader (CoOp split_zhou files where they exist)",
    )


def mtil_label(order: int, shots: int | None) -> str:
    """Run label of an ``mtil`` stream, e.g. ``mtil-order1-full`` or ``mtil-order2-5shot``."""
    return f"mtil-order{order}-{_shots_label(shots)}"


def mtil_stream(data_root: str | os.PathLike, *, order: int = 1, shots: int | None = None, seed: int = 1,
                cache_dir: str | os.PathLike | None = None) -> ContinualStream:
    """The 11 MTIL tasks in Order I or II; full (``shots=None``) or few-shot (5-shot in the papers)."""
    if order not in MTIL_ORDERS:
        raise ValueError(f"MTIL has orders 1 and 2, got {order!r}")
    tasks = tuple(_task_from_splits(_read(name, data_root, shots, seed, cache_dir)) for name in MTIL_ORDERS[order])
    return ContinualStream(
        kind="mtil",
        label=mtil_label(order, shots),
        tasks=tasks,
        task_aware=True,
        order=order,
        shots=shots,
        split_convention=(
            "CoOp split_zhou train/test lists for the nine CoOp datasets (Caltech101 has 100 classes); "
            "official train/test splits of CIFAR-100 and MNIST. ZSCL and MoE-Adapters split Caltech101, "
            "EuroSAT and SUN397 80/20 at random instead."
        ),
    )


def class_steps(num_classes: int, classes_per_step: int, initial_classes: int | None = None) -> list[int]:
    """Sizes of the class-incremental steps. The last step takes any remainder.

    With N classes, the first step has ``initial_classes`` (default ``classes_per_step``); then
    come full steps of ``classes_per_step``. The classes left over, fewer than a full step, join
    the last step, so no class is dropped. When fewer than ``classes_per_step`` remain after the
    first step, they form one last step.

    Raises:
        ValueError: for sizes < 1, or a first step that already takes every class.
    """
    initial = classes_per_step if initial_classes is None else initial_classes
    if classes_per_step < 1:
        raise ValueError(f"--classes-per-step must be >= 1, got {classes_per_step!r}")
    if initial < 1:
        raise ValueError(f"--initial-classes must be >= 1, got {initial!r}")
    if initial >= num_classes:
        raise ValueError(
            f"the first step takes {initial} of the {num_classes} classes, so no incremental step is left; "
            f"lower --initial-classes (or --classes-per-step) below {num_classes}"
        )
    remaining = num_classes - initial
    full, remainder = divmod(remaining, classes_per_step)
    sizes = [initial] + [classes_per_step] * full
    if remainder and full:
        sizes[-1] += remainder
        logger.info("%d classes left over after %d steps of %d join the last step", remainder, full, classes_per_step)
    elif remainder:
        sizes.append(remainder)
    return sizes


def seeded_class_order(num_classes: int, seed: int | None) -> list[int]:
    """Label order: ``numpy.random.RandomState(seed).permutation``, or label order for None."""
    if seed is None:
        return list(range(num_classes))
    return [int(label) for label in np.random.RandomState(seed).permutation(num_classes)]


def class_incremental_label(name: str, classes_per_step: int, initial_classes: int | None,
                            class_order_seed: int | None, train_classes: str, shots: int | None) -> str:
    """Run label of a ``class-incremental`` stream, e.g. ``class-incremental-sun397-b10-inc10-seed1993-current-16shot``."""
    initial = classes_per_step if initial_classes is None else initial_classes
    order = "labelorder" if class_order_seed is None else f"seed{class_order_seed}"
    return f"class-incremental-{name}-b{initial}-inc{classes_per_step}-{order}-{train_classes}-{_shots_label(shots)}"


def class_incremental_stream(name: str, data_root: str | os.PathLike, *, classes_per_step: int,
                             initial_classes: int | None = None,
                             class_order_seed: int | None = DEFAULT_CLASS_ORDER_SEED,
                             train_classes: TrainClasses = "current", shots: int | None = 16,
                             seed: int = 1, cache_dir: str | os.PathLike | None = None) -> ContinualStream:
    """The classes of one dataset in steps, evaluated on the union of the classes seen so far.

    Labels are renumbered to positions in the class order, so the classes of step t are labels
    ``offset_t .. offset_t + size_t - 1`` of every evaluation after step t.

    Args:
        classes_per_step / initial_classes: step sizes; see :func:`class_steps`.
        class_order_seed: seed of the class order, None for label order.
        train_classes: ``"current"`` trains step t on its own classes only (labels relative to the
            step); ``"seen"`` trains on the union of the classes seen so far.
    """
    if train_classes not in ("current", "seen"):
        raise ValueError(f"train_classes must be 'current' or 'seen', got {train_classes!r}")
    splits = _read(name, data_root, shots, seed, cache_dir)
    order = seeded_class_order(splits.num_classes, class_order_seed)
    sizes = class_steps(splits.num_classes, classes_per_step, initial_classes)
    position = {label: index for index, label in enumerate(order)}

    def relabel(items: Sequence[Datum], keep: range, shift: int) -> tuple[Datum, ...]:
        selected = (item for item in items if position[item.label] in keep)
        return tuple(dataclasses.replace(item, label=position[item.label] - shift) for item in selected)

    tasks = []
    start = 0
    for step, size in enumerate(sizes):
        keep = range(start, start + size)
        own = LabelSpace(tuple(splits.classnames[order[i]] for i in keep), splits.template, splits.name)
        if train_classes == "current":
            train, trained_on = relabel(splits.train, keep, start), own
        else:
            seen = tuple(splits.classnames[order[i]] for i in range(start + size))
            train, trained_on = relabel(splits.train, keep, 0), LabelSpace(seen, splits.template, splits.name)
        test = relabel(splits.test, keep, 0)
        if not train or not test:
            raise ValueError(f"step {step + 1} of {name!r} has {len(train)} train and {len(test)} test images; every step needs both")
        tasks.append(ContinualTask(f"{name} step {step + 1}", name, splits.image_root, train, test, own, trained_on))
        start += size

    return ContinualStream(
        kind="class-incremental",
        label=class_incremental_label(name, classes_per_step, initial_classes, class_order_seed, train_classes, shots),
        tasks=tuple(tasks),
        task_aware=False,
        shots=shots,
        class_order=tuple(order),
        split_convention=f"train and test lists of the {name!r} reader, classes split by the class order",
    )


def base_novel_label(name: str, shots: int | None) -> str:
    """Run label of a ``base-novel`` stream, e.g. ``base-novel-eurosat-16shot``."""
    return f"base-novel-{name}-{_shots_label(shots)}"


def base_novel_stream(name: str, data_root: str | os.PathLike, *, shots: int | None = 16, seed: int = 1,
                      cache_dir: str | os.PathLike | None = None) -> ContinualStream:
    """Two tasks: the base half of the classes, then the novel half, each scored on its own classes.

    The few-shot sample is drawn on all classes before the class split, as in the base-to-novel
    protocol, so the two tasks are the halves of one sample.
    """
    splits = _read(name, data_root, shots, seed, cache_dir)
    base, novel = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    tasks = (_task_from_splits(base, f"{name} base"), _task_from_splits(novel, f"{name} novel"))
    return ContinualStream(
        kind="base-novel",
        label=base_novel_label(name, shots),
        tasks=tasks,
        task_aware=True,
        shots=shots,
        split_convention=f"the CoOp base/novel halves of {name!r} (first ceil(K/2) labels are base)",
    )


@dataclass(frozen=True)
class StreamSpec:
    """Which stream to build, as the command line gives it; the data-independent half of a run.

    Attributes:
        kind: one of ``STREAMS``.
        datasets: for ``datasets``, the ordered dataset names (``all`` for the 11 CoOp datasets);
            for ``class-incremental`` and ``base-novel``, exactly one name; unused for ``mtil``.
        order: 1 or 2 (``mtil``: Order I or II; ``datasets``: as listed or reversed).
        classes_per_step / initial_classes / class_order_seed / train_classes: the
            ``class-incremental`` options, see :func:`class_incremental_stream`.
    """

    kind: str = "datasets"
    datasets: tuple[str, ...] = ("all",)
    order: int = 1
    classes_per_step: int | None = None
    initial_classes: int | None = None
    class_order_seed: int | None = DEFAULT_CLASS_ORDER_SEED
    train_classes: TrainClasses = "current"

    def __post_init__(self) -> None:
        if self.kind not in STREAMS:
            raise ValueError(f"unknown stream {self.kind!r}; choose one of {', '.join(STREAMS)}")
        if self.order not in (1, 2):
            raise ValueError(f"--order must be 1 or 2, got {self.order!r}")
        if self.kind == "datasets":
            object.__setattr__(self, "datasets", tuple(expand_dataset_names(self.datasets)))
        if self.kind in ("class-incremental", "base-novel") and len(self.datasets) != 1:
            raise ValueError(f"the {self.kind} stream takes one dataset (--dataset NAME), got {list(self.datasets)}")
        if self.kind == "class-incremental":
            if self.classes_per_step is None:
                raise ValueError("the class-incremental stream needs --classes-per-step")
            if self.train_classes not in ("current", "seen"):
                raise ValueError(f"--train-classes must be 'current' or 'seen', got {self.train_classes!r}")

    def label(self, shots: int | None) -> str:
        """Run label of the stream this spec builds with ``shots``."""
        if self.kind == "datasets":
            return datasets_label(self.datasets, self.order, shots)
        if self.kind == "mtil":
            return mtil_label(self.order, shots)
        if self.kind == "class-incremental":
            return class_incremental_label(self.datasets[0], self.classes_per_step, self.initial_classes,
                                           self.class_order_seed, self.train_classes, shots)
        return base_novel_label(self.datasets[0], shots)

    def build(self, data_root: str | os.PathLike, *, shots: int | None, seed: int,
              cache_dir: str | os.PathLike | None = None) -> ContinualStream:
        """Read the datasets and build the stream (few-shot samples drawn with ``seed``)."""
        common = {"shots": shots, "seed": seed, "cache_dir": cache_dir}
        if self.kind == "datasets":
            return datasets_stream(self.datasets, data_root, order=self.order, **common)
        if self.kind == "mtil":
            return mtil_stream(data_root, order=self.order, **common)
        if self.kind == "class-incremental":
            return class_incremental_stream(
                self.datasets[0], data_root, classes_per_step=self.classes_per_step,
                initial_classes=self.initial_classes, class_order_seed=self.class_order_seed,
                train_classes=self.train_classes, **common,
            )
        return base_novel_stream(self.datasets[0], data_root, **common)

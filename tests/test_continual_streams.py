"""Continual streams on fake datasets: experiences, class sets, orders, and the CIFAR/MNIST readers."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import STANDARD_DATASETS, read_dataset
from benchmarks.continual import (
    MTIL_ORDERS,
    StreamSpec,
    base_novel_stream,
    class_incremental_stream,
    class_steps,
    datasets_stream,
    expand_dataset_names,
    mtil_stream,
    seeded_class_order,
)
from tests.fixtures.coop_layouts import make_dataset
from tests.fixtures.torchvision_layouts import make_cifar100, make_mnist, write_idx

MTIL_ORDER_I = [
    "fgvc_aircraft", "caltech101", "cifar100", "dtd", "eurosat", "oxford_flowers", "food101", "mnist",
    "oxford_pets", "stanford_cars", "sun397",
]
MTIL_ORDER_II = [
    "stanford_cars", "food101", "mnist", "oxford_pets", "oxford_flowers", "sun397", "fgvc_aircraft",
    "caltech101", "dtd", "eurosat", "cifar100",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("continual_data")
    for name in MTIL_ORDER_I:
        make_dataset(name, root, per_class=(3, 1, 2))
    make_dataset("fgvc_aircraft", root / "seven", num_classes=7, per_class=(2, 1, 2))
    return root


# ---------------------------------------------------------------------------------------------
# datasets


def test_datasets_stream_order_and_class_sets(data_root: Path) -> None:
    stream = datasets_stream(["eurosat,dtd", "food101"], data_root, shots=2, seed=1)
    reversed_stream = datasets_stream(["eurosat,dtd", "food101"], data_root, order=2, shots=2, seed=1)

    assert stream.task_names == ["eurosat", "dtd", "food101"]
    assert reversed_stream.task_names == ["food101", "dtd", "eurosat"]
    assert stream.task_aware
    assert stream.label == "datasets-eurosat+dtd+food101-order1-2shot"
    for task in stream.tasks:
        splits = read_dataset(task.dataset, data_root)
        assert task.classes.classnames == splits.classnames
        assert task.classes.template == splits.template
        assert task.train_classes == task.classes
        assert len(task.train) == 2 * len(splits.classnames)
        assert len(task.test) == len(splits.test)
    for point in range(len(stream) + 1):
        assert stream.eval_columns(point) == [0, 1, 2]
        for column in range(3):
            assert stream.eval_classes(point, column) == stream.tasks[column].classes


def test_datasets_stream_benchmark_task_labels(data_root: Path) -> None:
    stream = datasets_stream(["eurosat", "dtd"], data_root, shots=1, seed=1)
    benchmark = stream.build_benchmark(image_size=32)
    scenario = benchmark.scenario

    assert len(scenario.train_stream) == 2
    assert len(scenario.test_stream) == 2
    for index, (train, test) in enumerate(zip(scenario.train_stream, scenario.test_stream)):
        assert train.task_labels == [index]
        assert test.task_labels == [index]
        assert len(train.dataset) == len(stream.tasks[index].train)
        image, label, task = train.dataset[0]
        assert image.shape == (3, 32, 32)
        assert task == index
        assert 0 <= label < len(stream.tasks[index].classes.classnames)


def test_expand_dataset_names() -> None:
    assert expand_dataset_names(["all"]) == list(STANDARD_DATASETS)
    assert expand_dataset_names(["dtd,eurosat", "food101"]) == ["dtd", "eurosat", "food101"]
    with pytest.raises(ValueError, match="twice"):
        expand_dataset_names(["dtd", "dtd"])
    with pytest.raises(ValueError, match="no datasets"):
        expand_dataset_names([" , "])


def test_datasets_stream_rejects_test_only(data_root: Path) -> None:
    with pytest.raises(ValueError, match="test split only"):
        datasets_stream(["imagenet_a"], data_root)


# ---------------------------------------------------------------------------------------------
# mtil


def test_mtil_orders_match_zscl() -> None:
    assert list(MTIL_ORDERS[1]) == MTIL_ORDER_I
    assert list(MTIL_ORDERS[2]) == MTIL_ORDER_II


@pytest.mark.parametrize(("order", "expected"), [(1, MTIL_ORDER_I), (2, MTIL_ORDER_II)])
def test_mtil_stream_tasks(data_root: Path, order: int, expected: list[str]) -> None:
    full = mtil_stream(data_root, order=order, shots=None)
    few = mtil_stream(data_root, order=order, shots=1, seed=3)

    assert full.task_names == expected
    assert full.label == f"mtil-order{order}-full"
    assert few.label == f"mtil-order{order}-1shot"
    assert full.task_aware and full.order == order
    cifar = full.tasks[expected.index("cifar100")]
    assert cifar.classes.classnames == ("apple", "aquarium fish", "baby", "bear", "beaver")
    mnist = few.tasks[expected.index("mnist")]
    assert mnist.classes.classnames == tuple(str(d) for d in range(10))
    assert mnist.classes.template == 'a photo of the number: "{}".'
    for task_full, task_few in zip(full.tasks, few.tasks):
        assert len(task_few.train) == len(task_few.classes.classnames)
        assert len(task_full.train) == 3 * len(task_full.classes.classnames)
        assert task_few.test == task_full.test


# ---------------------------------------------------------------------------------------------
# torchvision formats


def test_cifar100_reader_decodes_pixels_once(tmp_path: Path) -> None:
    make_cifar100(tmp_path, num_classes=3, per_class=(2, 0, 1))
    splits = read_dataset("cifar100", tmp_path)
    payload = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    expected = payload["data"][1].reshape(3, 32, 32).transpose(1, 2, 0)  # (32, 32, 3)

    with Image.open(splits.image_root / splits.train[1].impath) as image:
        decoded = np.asarray(image.convert("RGB"))
    split_file = tmp_path / "cifar-100-python" / "vlprompt" / "split.json"
    written = split_file.stat().st_mtime_ns
    read_dataset("cifar100", tmp_path)

    assert splits.classnames == ("apple", "aquarium fish", "baby")
    assert [item.label for item in splits.train] == [0, 0, 1, 1, 2, 2]
    assert len(splits.test) == 3
    assert splits.val == ()
    assert np.array_equal(decoded, expected)
    assert split_file.stat().st_mtime_ns == written


def test_cifar100_reader_rejects_code_in_pickle(tmp_path: Path) -> None:
    make_cifar100(tmp_path, num_classes=2, per_class=(1, 0, 1))
    (tmp_path / "cifar-100-python" / "meta").write_bytes(pickle.dumps({"fine_label_names": print}))

    with pytest.raises(ValueError, match="not a CIFAR-100 python pickle"):
        read_dataset("cifar100", tmp_path)


def test_cifar100_missing_files_named(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"")

    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/test.*cifar-100-python/meta.*CIFAR100\(DATA_ROOT"):
        read_dataset("cifar100", tmp_path)


def test_mnist_reader_plain_and_gzip(tmp_path: Path) -> None:
    make_mnist(tmp_path, per_class=(2, 0, 1), image_size=28, compress_test=True)
    splits = read_dataset("mnist", tmp_path)
    with gzip.open(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", "rb") as handle:
        pixels = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)

    with Image.open(splits.image_root / splits.test[4].impath) as image:
        decoded = np.asarray(image)

    assert splits.classnames == tuple(str(d) for d in range(10))
    assert len(splits.train) == 20
    assert [item.label for item in splits.test] == list(range(10))
    assert np.array_equal(decoded, pixels[4])


def test_mnist_missing_and_corrupt_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="MNIST/raw/train-images-idx3-ubyte.*MNIST/raw/t10k-labels-idx1-ubyte"):
        read_dataset("mnist", tmp_path)

    make_mnist(tmp_path, per_class=(1, 0, 1))
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros((10, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file with 1 dimensions"):
        read_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------
# class-incremental


@pytest.mark.parametrize(
    ("num_classes", "per_step", "initial", "sizes"),
    [
        (10, 3, None, [3, 3, 4]),
        (10, 3, 4, [4, 3, 3]),
        (11, 3, 4, [4, 3, 4]),
        (10, 4, 8, [8, 2]),
        (10, 5, None, [5, 5]),
        (100, 10, None, [10] * 10),
    ],
)
def test_class_steps_keep_every_class(num_classes: int, per_step: int, initial: int | None, sizes: list[int]) -> None:
    assert class_steps(num_classes, per_step, initial) == sizes
    assert sum(sizes) == num_classes


@pytest.mark.parametrize(("per_step", "initial", "message"), [(0, None, "classes-per-step"), (3, 0, "initial-classes"), (3, 10, "no incremental step")])
def test_class_steps_errors(per_step: int, initial: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        class_steps(10, per_step, initial)


def test_seeded_class_order() -> None:
    order = seeded_class_order(100, 1993)

    assert order == [int(i) for i in np.random.RandomState(1993).permutation(100)]
    assert sorted(order) == list(range(100))
    assert order != list(range(100))
    assert seeded_class_order(5, None) == [0, 1, 2, 3, 4]


def test_class_incremental_stream_steps_and_union(data_root: Path) -> None:
    root = data_root / "seven"
    stream = class_incremental_stream("fgvc_aircraft", root, classes_per_step=2, initial_classes=3,
                                      class_order_seed=7, shots=None)
    splits = read_dataset("fgvc_aircraft", root)
    order = seeded_class_order(7, 7)

    assert [len(t.classes.classnames) for t in stream.tasks] == [3, 2, 2]
    assert not stream.task_aware
    assert stream.class_order == tuple(order)
    arrived = [name for task in stream.tasks for name in task.classes.classnames]
    assert arrived == [splits.classnames[label] for label in order]
    offset = 0
    for index, task in enumerate(stream.tasks):
        size = len(task.classes.classnames)
        assert task.train_classes == task.classes
        assert {item.label for item in task.train} == set(range(size))
        assert {item.label for item in task.test} == set(range(offset, offset + size))
        for item in task.train:
            assert splits.classnames[order[item.label + offset]] == item.classname
        offset += size
    assert stream.eval_columns(0) == [0]
    assert stream.eval_columns(1) == [0]
    assert stream.eval_columns(3) == [0, 1, 2]
    assert stream.eval_classes(0, 0).classnames == tuple(arrived[:3])
    assert stream.eval_classes(2, 1).classnames == tuple(arrived[:5])
    assert stream.eval_classes(3, 0).classnames == tuple(arrived)
    with pytest.raises(ValueError, match="not evaluated"):
        stream.eval_classes(1, 1)


def test_class_incremental_seen_training_classes(data_root: Path) -> None:
    stream = class_incremental_stream("fgvc_aircraft", data_root / "seven", classes_per_step=3,
                                      train_classes="seen", shots=None)

    last = stream.tasks[-1]
    assert [len(t.train_classes.classnames) for t in stream.tasks] == [3, 7]
    assert last.train_classes == stream.seen_classes(1)
    assert {item.label for item in last.train} == {3, 4, 5, 6}


def test_base_novel_stream(data_root: Path) -> None:
    stream = base_novel_stream("dtd", data_root, shots=2, seed=1)
    splits = read_dataset("dtd", data_root)

    assert stream.task_names == ["dtd base", "dtd novel"]
    assert stream.tasks[0].classes.classnames == splits.classnames[:3]
    assert stream.tasks[1].classes.classnames == splits.classnames[3:]
    assert stream.task_aware
    assert {item.label for item in stream.tasks[1].test} == {0, 1}


def test_stream_spec_labels_and_errors() -> None:
    assert StreamSpec(kind="mtil", order=2).label(5) == "mtil-order2-5shot"
    assert StreamSpec(datasets=("all",)).label(16) == "datasets-coop11-order1-16shot"
    many = StreamSpec(datasets=("dtd,eurosat,food101,sun397,ucf101",))
    assert many.label(None).startswith("datasets-5tasks-")
    cil = StreamSpec(kind="class-incremental", datasets=("sun397",), classes_per_step=10)
    assert cil.label(None) == "class-incremental-sun397-b10-inc10-seed1993-current-full"
    with pytest.raises(ValueError, match="--classes-per-step"):
        StreamSpec(kind="class-incremental", datasets=("sun397",))
    with pytest.raises(ValueError, match="one dataset"):
        StreamSpec(kind="base-novel", datasets=())
    with pytest.raises(ValueError, match="unknown stream"):
        StreamSpec(kind="tasks")
    with pytest.raises(ValueError, match="--order"):
        StreamSpec(kind="mtil", order=3)


def test_build_benchmark_test_labels_stay_global(data_root: Path) -> None:
    stream = class_incremental_stream("fgvc_aircraft", data_root / "seven", classes_per_step=4, shots=1)
    scenario = stream.build_benchmark(image_size=32).scenario
    labels = [int(y) for _, y, _ in scenario.test_stream[1].dataset]

    assert min(labels) >= 4
    assert torch.tensor(labels).max().item() < 7

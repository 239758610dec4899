"""Federated partition schemes: documented class sets, sizes, remainder rules and determinism."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks import DatasetSplits, Datum
from benchmarks.partitions import (
    FederatedPartition,
    PartitionConfig,
    build_partition,
    dirichlet_label_split,
    divide_test_by_share,
    fedotp_class_blocks,
    fedtpg_class_chunks,
    write_partition,
)


def make_splits(name: str, num_classes: int, train_per_class: int, test_per_class: int, root: Path) -> DatasetSplits:
    """A dataset of paths only (partitions never open images)."""
    classnames = tuple(f"{name} class {c}" for c in range(num_classes))
    train = tuple(Datum(f"train/{c}/{i}.png", c, classnames[c]) for c in range(num_classes) for i in range(train_per_class))
    test = tuple(Datum(f"test/{c}/{i}.png", c, classnames[c]) for c in range(num_classes) for i in range(test_per_class))
    return DatasetSplits(name=name, image_root=root.resolve(), train=train, val=(), test=test,
                         classnames=classnames, template="a photo of a {}.")


# ---------------------------------------------------------------------------------------------
# FedOTP blocks


@pytest.mark.parametrize(
    "num_classes, sizes",
    [
        (37, [4] * 9 + [1]),  # OxfordPets: k = round(3.7) = 4, the last client keeps 1 class
        (47, [5] * 9 + [2]),  # DTD: k = round(4.7) = 5, the last client keeps 2
        (100, [10] * 10),  # Caltech101 (CoOp split)
        (102, [10] * 9 + [12]),  # Flowers102: the remainder goes to the last client
        (101, [10] * 9 + [11]),  # Food101
    ],
)
def test_fedotp_block_sizes(num_classes, sizes):
    blocks = fedotp_class_blocks(num_classes, 10)
    assert [len(b) for b in blocks] == sizes
    assert sorted(c for b in blocks for c in b) == list(range(num_classes))


def test_fedotp_blocks_follow_seeded_shuffle():
    expected = list(range(37))
    random.seed(2023)  # FedOTP's dataset code seeds the global generator, then shuffles
    random.shuffle(expected)
    blocks = fedotp_class_blocks(37, 10)
    assert blocks[0] == expected[0:4]
    assert blocks[8] == expected[32:36]
    assert blocks[9] == expected[36:]


def test_fedotp_blocks_use_half_even_rounding():
    # 10 classes / 4 clients = 2.5 rounds to 2 under Python's round, leaving 4 to the last client.
    assert [len(b) for b in fedotp_class_blocks(10, 4)] == [2, 2, 2, 4]


def test_fedotp_rejects_empty_client():
    # 3 classes over 4 clients: k = round(0.75) = 1, so the last client would get nothing.
    with pytest.raises(ValueError, match="without classes"):
        fedotp_class_blocks(3, 4)
    # 2 classes over 5 clients: k = round(0.4) = 0, so every block is empty.
    with pytest.raises(ValueError, match="without classes"):
        fedotp_class_blocks(2, 5)


# ---------------------------------------------------------------------------------------------
# FedTPG chunks


@pytest.mark.parametrize(
    "base_classes, sizes",
    [
        (50, [20, 30]),  # Caltech101 and FGVCAircraft: around(2.5) = 2 clients
        (51, [20, 20, 11]),  # Flowers102, UCF101, Food101
        (19, [19]),  # OxfordPets
        (24, [24]),  # DTD
        (98, [20, 20, 20, 20, 18]),  # StanfordCars
        (199, [20] * 9 + [19]),  # SUN397
    ],
)
def test_fedtpg_chunk_sizes(base_classes, sizes):
    chunks = fedtpg_class_chunks(base_classes)
    assert [len(c) for c in chunks] == sizes
    assert [c for chunk in chunks for c in chunk] == list(range(base_classes))


def test_fedtpg_cross_class_has_30_clients():
    base = {"caltech101": 50, "oxford_flowers": 51, "fgvc_aircraft": 50, "ucf101": 51, "oxford_pets": 19,
            "food101": 51, "dtd": 24, "stanford_cars": 98, "sun397": 199}
    assert sum(len(fedtpg_class_chunks(n)) for n in base.values()) == 30


# ---------------------------------------------------------------------------------------------
# Dirichlet


def test_dirichlet_assigns_every_item_once():
    labels = [c for c in range(10) for _ in range(30)]
    parts = dirichlet_label_split(labels, 5, 0.5, np.random.default_rng(0))
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(labels)))


def test_dirichlet_is_seeded():
    labels = [c for c in range(10) for _ in range(30)]
    first = dirichlet_label_split(labels, 5, 0.5, np.random.default_rng(7))
    second = dirichlet_label_split(labels, 5, 0.5, np.random.default_rng(7))
    other = dirichlet_label_split(labels, 5, 0.5, np.random.default_rng(8))
    assert first == second
    assert first != other


def test_dirichlet_alpha_controls_skew():
    labels = [c for c in range(10) for _ in range(100)]

    def mean_classes_per_client(alpha: float) -> float:
        parts = dirichlet_label_split(labels, 10, alpha, np.random.default_rng(0))
        return float(np.mean([len({labels[i] for i in part}) for part in parts]))

    assert mean_classes_per_client(0.05) < 5
    assert mean_classes_per_client(100.0) == 10


def test_dirichlet_min_size_unreachable():
    with pytest.raises(ValueError, match="fewer clients"):
        dirichlet_label_split([0, 1, 2], 5, 0.5, np.random.default_rng(0), min_size=1)


def test_test_share_follows_train_counts():
    test = [Datum(f"t{i}", 0, "a") for i in range(10)] + [Datum(f"u{i}", 1, "b") for i in range(3)]
    counts = [{0: 3, 1: 1}, {0: 1}, {}]
    parts = divide_test_by_share(test, counts, random.Random(0))
    assert [sum(1 for d in p if d.label == 0) for p in parts] == [8, 2, 0]  # 7.5 / 2.5 -> 8 / 2 (largest remainder, ties to the lower id)
    assert [sum(1 for d in p if d.label == 1) for p in parts] == [3, 0, 0]
    assert sorted(d.impath for p in parts for d in p) == sorted(d.impath for d in test)


def test_test_share_drops_unheld_class():
    test = [Datum("x", 0, "a"), Datum("y", 1, "b")]
    parts = divide_test_by_share(test, [{0: 2}], random.Random(0))
    assert [d.label for d in parts[0]] == [0]


# ---------------------------------------------------------------------------------------------
# Whole federations


def test_dirichlet_partition_caps_shots(tmp_path):
    splits = make_splits("toy", 6, train_per_class=20, test_per_class=10, root=tmp_path)
    partition = build_partition([splits], PartitionConfig(scheme="dirichlet", num_clients=4, alpha=0.5, shots=3, seed=1))
    assert partition.num_clients == 4
    for client in partition.clients:
        counts = Counter(d.label for d in client.train)
        assert max(counts.values()) <= 3
        assert set(counts) == set(client.labels)
        assert {d.label for d in client.test} <= set(client.labels)
    assert sum(len(c.test) for c in partition.clients) == len(splits.test)


def test_fedotp_partition_sets_and_sizes(tmp_path):
    splits = make_splits("toy", 7, train_per_class=5, test_per_class=2, root=tmp_path)
    partition = build_partition([splits], PartitionConfig(scheme="fedotp", num_clients=3, shots=2, seed=1))
    blocks = fedotp_class_blocks(7, 3)  # round(7/3) = 2 -> 2, 2, 3
    assert [len(b) for b in blocks] == [2, 2, 3]
    for client, block in zip(partition.clients, blocks):
        assert client.labels == tuple(sorted(block))
        assert len(client.train) == 2 * len(block)
        assert len(client.test) == 2 * len(block)
        assert {d.label for d in client.test} == set(block)


def test_fedtpg_client_count_is_derived(tmp_path):
    splits = make_splits("toy", 50, train_per_class=1, test_per_class=1, root=tmp_path)
    partition = build_partition([splits], PartitionConfig(scheme="fedtpg", num_clients=None, shots=None))
    assert [len(c.labels) for c in partition.clients] == [20, 30]
    with pytest.raises(ValueError, match="derives 2 clients"):
        build_partition([splits], PartitionConfig(scheme="fedtpg", num_clients=10, shots=None))


def test_multidomain_one_dataset_per_client(tmp_path):
    first = make_splits("first", 3, train_per_class=4, test_per_class=2, root=tmp_path)
    second = make_splits("second", 5, train_per_class=4, test_per_class=1, root=tmp_path)
    partition = build_partition([first, second], PartitionConfig(scheme="multidomain", num_clients=None, shots=2))
    assert [c.dataset for c in partition.clients] == ["first", "second"]
    assert partition.clients[1].labels == (0, 1, 2, 3, 4)
    assert len(partition.clients[1].train) == 10
    assert len(partition.clients[0].test) == 6
    with pytest.raises(ValueError, match="one client per dataset"):
        build_partition([first, second], PartitionConfig(scheme="multidomain", num_clients=3))


def test_base2novel_clients_hold_base_only(tmp_path):
    first = make_splits("first", 9, train_per_class=3, test_per_class=2, root=tmp_path)  # base 5, novel 4
    second = make_splits("second", 4, train_per_class=3, test_per_class=2, root=tmp_path)  # base 2, novel 2
    config = PartitionConfig(scheme="base2novel", base_scheme="fedotp", num_clients=2, shots=1)
    partition = build_partition([first, second], config)
    assert [c.client_id for c in partition.clients] == [0, 1, 2, 3]
    assert partition.domains["first"].classnames == first.classnames[:5]
    assert partition.novel["first"].classnames == first.classnames[5:]
    assert len(partition.novel["first"].test) == 8
    for client in partition.clients:
        base = partition.domains[client.dataset]
        assert max(client.labels) < base.num_classes
        assert all(d.classname in base.classnames for d in client.train + client.test)
    assert sorted(c for client in partition.clients[:2] for c in client.labels) == [0, 1, 2, 3, 4]


def test_single_dataset_schemes_reject_several(tmp_path):
    first = make_splits("first", 4, 2, 1, tmp_path)
    second = make_splits("second", 4, 2, 1, tmp_path)
    with pytest.raises(ValueError, match="splits one dataset"):
        build_partition([first, second], PartitionConfig(scheme="dirichlet", num_clients=2))


def test_digest_and_json(tmp_path):
    splits = make_splits("toy", 6, train_per_class=6, test_per_class=2, root=tmp_path)
    config = PartitionConfig(scheme="dirichlet", num_clients=3, alpha=1.0, shots=2, seed=1)
    partition = build_partition([splits], config)
    again = build_partition([splits], config)
    reseeded = build_partition([splits], PartitionConfig(scheme="dirichlet", num_clients=3, alpha=1.0, shots=2, seed=2))
    assert partition.digest() == again.digest()
    assert partition.digest() != reseeded.digest()

    path = write_partition(tmp_path / "partitions.json", partition)
    payload = json.loads(path.read_text())
    assert payload["digest"] == partition.digest()
    assert payload["config"]["alpha"] == 1.0
    assert [c["num_train"] for c in payload["clients"]] == [len(c.train) for c in partition.clients]
    assert payload["clients"][0]["train"][0] == [partition.clients[0].train[0].impath, partition.clients[0].train[0].label]
    assert isinstance(partition, FederatedPartition)


def test_config_needs_clients_for_split_schemes():
    with pytest.raises(ValueError, match="needs num_clients"):
        PartitionConfig(scheme="fedotp", num_clients=None)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        PartitionConfig(alpha=0.0)

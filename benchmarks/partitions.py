"""Federated partitions: which images and classes each client holds.

Five schemes, each reproducing a published protocol where one exists:

- ``dirichlet``: label skew. For every class, the class's train images are shuffled and cut
  among the clients by proportions drawn from Dir(alpha), the per-class rule of the NIID-bench
  ``noniid-labeldir`` split that FedOTP, FedPGP, PromptFolio and pFedMoAP use for CIFAR and the
  CLIP datasets. A small alpha gives each client few classes.
- ``fedotp``: disjoint class blocks as in FedOTP (``generate_federated_fewshot_dataset``). The
  class list is shuffled with ``random.Random(2023)`` and client i takes the block
  ``[i*k, (i+1)*k)`` with ``k = round(C / N)`` (Python's round, half to even). The last client
  takes every class left, so OxfordPets (37 classes, 10 clients) leaves 1 class to the last client
  and DTD (47 classes) leaves 2.
- ``fedtpg``: disjoint class chunks in label order as in FedTPG: chunks of ``classes_per_client``
  (20) classes, ``max(1, numpy.around(C / 20))`` clients, the last client taking the rest, so
  Caltech101's 50 base classes give 2 clients (20 and 30 classes) and SUN397's 199 give 10.
- ``multidomain``: one dataset per client, with all of its classes.
- ``base2novel``: clients hold only the base classes (the first ceil(C/2) labels, as CoOp's
  ``subsample_classes``), split by ``base_scheme`` (``fedtpg``, ``fedotp`` or ``dirichlet``); the
  novel classes are kept for evaluating the global prompt. Several datasets form one federation
  whose clients are the concatenation of each dataset's clients, which is FedTPG's 9-dataset,
  30-client cross-class protocol.

Few-shot sampling is per client: after the split, each client keeps at most ``shots`` train
images per class, drawn with the CoOp rule from ``random.Random(f"{seed}:{client_id}")``.

Each client's local test set holds the test images of its classes. Under ``dirichlet``, where
several clients share a class, the test images of a class are divided among the clients in
proportion to how many train images of that class each client received before few-shot
sampling, so a client's test labels follow its train labels.

This module knows nothing of models; it returns lists of `Datum` and writes them as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from benchmarks._io import write_json_atomic
from benchmarks.datasets import DatasetSplits, Datum
from benchmarks.fewshot import sample_fewshot
from benchmarks.splits import subsample_classes

PartitionScheme = Literal["dirichlet", "fedotp", "fedtpg", "multidomain", "base2novel"]
PARTITION_SCHEMES: tuple[str, ...] = get_args(PartitionScheme)
BaseScheme = Literal["fedtpg", "fedotp", "dirichlet"]
BASE_SCHEMES: tuple[str, ...] = get_args(BaseScheme)

FEDOTP_CLASS_SEED = 2023
"""Seed of FedOTP's class shuffle (``random.seed(2023)`` in its dataset code)."""
FEDTPG_CLASSES_PER_CLIENT = 20
"""Classes per client in FedTPG's cross-class protocol."""
DIRICHLET_MAX_TRIES = 100
"""Redraws of a Dirichlet split before giving up on ``min_train_size``."""
PARTITION_FORMAT = 1
"""Version of the partition JSON layout."""


@dataclass(frozen=True)
class PartitionConfig:
    """How to split one or more datasets among clients.

    Attributes:
        scheme: One of `PARTITION_SCHEMES`.
        num_clients: Clients per dataset for ``dirichlet`` and ``fedotp`` (and for ``base2novel``
            with those base schemes). ``fedtpg`` derives the count from ``classes_per_client``
            and ``multidomain`` has one client per dataset; for them this must be None or equal
            to the derived count.
        alpha: Dirichlet concentration (``dirichlet``); smaller is more skewed.
        classes_per_client: Chunk size of ``fedtpg``.
        class_seed: Seed of the ``fedotp`` class shuffle; FedOTP uses 2023 for every run seed.
        base_scheme: How ``base2novel`` splits the base classes.
        shots: Train images per class per client, or None to keep every image.
        seed: Seed of the Dirichlet draws, the few-shot samples and the test division.
        min_train_size: ``dirichlet`` redraws until every client has at least this many train
            images (before few-shot sampling).
    """

    scheme: str = "dirichlet"
    num_clients: int | None = 10
    alpha: float = 0.5
    classes_per_client: int = FEDTPG_CLASSES_PER_CLIENT
    class_seed: int = FEDOTP_CLASS_SEED
    base_scheme: str = "fedtpg"
    shots: int | None = 16
    seed: int = 1
    min_train_size: int = 1

    def __post_init__(self) -> None:
        if self.scheme not in PARTITION_SCHEMES:
            raise ValueError(f"partition scheme must be one of {list(PARTITION_SCHEMES)}, got {self.scheme!r}")
        if self.base_scheme not in BASE_SCHEMES:
            raise ValueError(f"base_scheme must be one of {list(BASE_SCHEMES)}, got {self.base_scheme!r}")
        if self.num_clients is not None and self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}; Dir(alpha) needs a positive concentration")
        if self.classes_per_client < 1:
            raise ValueError(f"classes_per_client must be >= 1, got {self.classes_per_client!r}")
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"shots must be >= 1 or None for all images, got {self.shots!r}")
        if self.min_train_size < 0:
            raise ValueError(f"min_train_size must be >= 0, got {self.min_train_size!r}")
        if self.split_scheme in ("dirichlet", "fedotp") and self.num_clients is None:
            raise ValueError(f"the {self.split_scheme} split needs num_clients (--clients)")

    @property
    def split_scheme(self) -> str:
        """The class or label split applied to each dataset (``base_scheme`` under base2novel)."""
        return self.base_scheme if self.scheme == "base2novel" else self.scheme


@dataclass(frozen=True)
class ClientPartition:
    """The data of one client.

    Attributes:
        client_id: Index of the client, 0-based; Flower's ``partition-id``.
        dataset: Name of the client's dataset; labels are in that dataset's label space (the
            base-class label space under ``base2novel``).
        labels: Classes the client holds, sorted.
        train: Few-shot train items.
        test: Local test items (test images of the client's classes).
    """

    client_id: int
    dataset: str
    labels: tuple[int, ...]
    train: tuple[Datum, ...]
    test: tuple[Datum, ...]


@dataclass(frozen=True)
class FederatedPartition:
    """A whole federation: the clients and the label spaces they train in.

    Attributes:
        config: The partition settings.
        domains: Dataset name -> the splits the clients draw from: all classes, or only the
            base classes under ``base2novel``. Its ``test`` list is the global test set.
        novel: Dataset name -> the novel-class splits (``base2novel`` only, else empty).
        clients: One entry per client, ordered by ``client_id``.
    """

    config: PartitionConfig
    domains: dict[str, DatasetSplits]
    novel: dict[str, DatasetSplits] = field(default_factory=dict)
    clients: tuple[ClientPartition, ...] = ()

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def digest(self) -> str:
        """SHA-256 over the settings and every client's class and image lists.

        Two processes that build the same federation from the same files get the same digest,
        so a client can check that it has the partition the server planned.
        """
        payload = {
            "config": dataclasses.asdict(self.config),
            "clients": [_client_record(client, with_items=True) for client in self.clients],
            "novel": {name: len(splits.classnames) for name, splits in sorted(self.novel.items())},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready record of the federation (relative image paths, labels, class names)."""
        return {
            "format": PARTITION_FORMAT,
            "digest": self.digest(),
            "config": dataclasses.asdict(self.config),
            "datasets": {
                name: {
                    "classnames": list(splits.classnames),
                    "template": splits.template,
                    "num_test": len(splits.test),
                    "novel_classnames": list(self.novel[name].classnames) if name in self.novel else None,
                    "num_novel_test": len(self.novel[name].test) if name in self.novel else None,
                }
                for name, splits in self.domains.items()
            },
            "clients": [_client_record(client, with_items=True) for client in self.clients],
        }


def _client_record(client: ClientPartition, with_items: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "client_id": client.client_id,
        "dataset": client.dataset,
        "labels": list(client.labels),
        "num_train": len(client.train),
        "num_test": len(client.test),
    }
    if with_items:
        record["train"] = [[item.impath, item.label] for item in client.train]
        record["test"] = [[item.impath, item.label] for item in client.test]
    return record


def write_partition(path: str | os.PathLike[str], partition: FederatedPartition) -> Path:
    """Write `FederatedPartition.to_json` atomically to `path` and return the path."""
    path = Path(path)
    write_json_atomic(path, partition.to_json())
    return path


# ---------------------------------------------------------------------------------------------
# Split rules


def dirichlet_label_split(labels: Sequence[int], num_clients: int, alpha: float, rng: np.random.Generator,
                          min_size: int = 1, max_tries: int = DIRICHLET_MAX_TRIES) -> list[list[int]]:
    """Split item indices among clients with per-class Dir(alpha) proportions.

    For each class in label order, the class's indices are shuffled, proportions
    ``p ~ Dir(alpha * 1_N)`` are drawn, and the indices are cut at ``floor(cumsum(p) * n)``.
    The whole split is redrawn until every client has at least ``min_size`` items.

    Args:
        labels: Label of each item.
        num_clients: Number of clients N.
        alpha: Dirichlet concentration.
        rng: Generator the shuffles and proportions are drawn from; it is advanced.
        min_size: Items every client must receive.
        max_tries: Redraws before raising.

    Returns:
        Item indices per client, each list sorted.

    Raises:
        ValueError: If no draw within ``max_tries`` gives every client ``min_size`` items.
    """
    labels = np.asarray(labels)
    if min_size * num_clients > len(labels):
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} train images each from {len(labels)} images; "
            "use fewer clients or a smaller minimum"
        )
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            indices = np.flatnonzero(labels == label)
            rng.shuffle(indices)
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(proportions) * len(indices)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(indices, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    raise ValueError(
        f"Dirichlet split with alpha={alpha} left a client with fewer than {min_size} train images in "
        f"{max_tries} draws; raise alpha, lower the number of clients ({num_clients}) or the minimum size"
    )


def fedotp_class_blocks(num_classes: int, num_clients: int, seed: int = FEDOTP_CLASS_SEED) -> list[list[int]]:
    """FedOTP's disjoint class blocks: shuffled classes, ``round(C / N)`` each, rest to the last.

    Args:
        num_classes: Number of classes C (labels 0..C-1).
        num_clients: Number of clients N.
        seed: Seed of ``random.Random(seed).shuffle`` over the label list.

    Returns:
        Class labels per client, in shuffled order.

    Raises:
        ValueError: If a client would get no class.
    """
    classes = list(range(num_classes))
    random.Random(seed).shuffle(classes)
    block = round(num_classes / num_clients)
    blocks = [classes[i * block:(i + 1) * block] for i in range(num_clients - 1)]
    blocks.append(classes[(num_clients - 1) * block:])
    if any(not b for b in blocks):
        raise ValueError(
            f"FedOTP class blocks of {block} classes leave a client without classes ({num_classes} classes, "
            f"{num_clients} clients); use at most {max(num_classes // max(block, 1), 1)} clients"
        )
    return blocks


def fedtpg_class_chunks(num_classes: int, classes_per_client: int = FEDTPG_CLASSES_PER_CLIENT) -> list[list[int]]:
    """FedTPG's label-order chunks: ``max(1, around(C / size))`` clients, the rest to the last.

    Args:
        num_classes: Number of classes C (labels 0..C-1).
        classes_per_client: Chunk size.

    Returns:
        Class labels per client, in label order.
    """
    num_clients = max(1, int(np.around(num_classes / classes_per_client)))
    chunks = [list(range(i * classes_per_client, (i + 1) * classes_per_client)) for i in range(num_clients - 1)]
    chunks.append(list(range((num_clients - 1) * classes_per_client, num_classes)))
    return chunks


def divide_test_by_share(test: Sequence[Datum], train_counts: Sequence[dict[int, int]],
                         rng: random.Random) -> list[list[Datum]]:
    """Divide each class's test items among clients in proportion to their train counts.

    Shares are rounded by the largest-remainder rule, so every test item goes to exactly one
    client that has train images of its class. Classes without train images on any client are
    dropped.

    Args:
        test: Test items of the dataset.
        train_counts: Per client, label -> number of train items of that label.
        rng: Random stream for shuffling each class's test items; it is advanced.

    Returns:
        Test items per client.
    """
    by_label: dict[int, list[Datum]] = {}
    for item in test:
        by_label.setdefault(item.label, []).append(item)
    parts: list[list[Datum]] = [[] for _ in train_counts]
    for label in sorted(by_label):
        weights = [counts.get(label, 0) for counts in train_counts]
        total = sum(weights)
        if total == 0:
            continue
        items = list(by_label[label])
        rng.shuffle(items)
        exact = [len(items) * w / total for w in weights]
        sizes = [math.floor(e) for e in exact]
        order = sorted(range(len(exact)), key=lambda c: (-(exact[c] - sizes[c]), c))
        for client in order[: len(items) - sum(sizes)]:
            sizes[client] += 1
        start = 0
        for client, size in enumerate(sizes):
            parts[client].extend(items[start:start + size])
            start += size
    return parts


# ---------------------------------------------------------------------------------------------
# Building a federation


def build_partition(splits: Sequence[DatasetSplits], config: PartitionConfig) -> FederatedPartition:
    """Split full (not few-shot) datasets among clients as ``config`` specifies.

    Args:
        splits: Output of `read_dataset` for each dataset of the federation. ``multidomain``
            and ``base2novel`` accept several datasets (one federation); the other schemes take
            exactly one.
        config: The partition settings.

    Returns:
        The federation, with client ids numbered across datasets in the given order.

    Raises:
        ValueError: On a dataset count the scheme does not accept, a client count that
            contradicts a derived one, or a split that leaves a client empty.
    """
    if not splits:
        raise ValueError("build_partition needs at least one dataset")
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"each dataset may appear once in a federation, got {names}")
    if config.scheme not in ("multidomain", "base2novel") and len(splits) != 1:
        raise ValueError(
            f"partition {config.scheme!r} splits one dataset, got {len(splits)} ({', '.join(names)}); "
            "run one federation per dataset, or use multidomain or base2novel to federate several"
        )
    if config.scheme == "multidomain":
        return _build_multidomain(splits, config)

    domains: dict[str, DatasetSplits] = {}
    novel: dict[str, DatasetSplits] = {}
    clients: list[ClientPartition] = []
    for dataset in splits:
        domain = dataset
        if config.scheme == "base2novel":
            domain = subsample_classes(dataset, "base")
            novel[dataset.name] = subsample_classes(dataset, "new")
        domains[dataset.name] = domain
        clients.extend(_split_dataset(domain, config, first_id=len(clients)))
    return FederatedPartition(config=config, domains=domains, novel=novel, clients=tuple(clients))


def _build_multidomain(splits: Sequence[DatasetSplits], config: PartitionConfig) -> FederatedPartition:
    if config.num_clients is not None and config.num_clients != len(splits):
        raise ValueError(
            f"multidomain gives one client per dataset, so {len(splits)} datasets make {len(splits)} clients, "
            f"but num_clients={config.num_clients}; leave --clients unset or list {config.num_clients} datasets"
        )
    clients = []
    for client_id, dataset in enumerate(splits):
        labels = tuple(range(dataset.num_classes))
        clients.append(_client(client_id, dataset, labels, list(dataset.train), list(dataset.test), config))
    return FederatedPartition(config=config, domains={s.name: s for s in splits}, clients=tuple(clients))


def _split_dataset(domain: DatasetSplits, config: PartitionConfig, first_id: int) -> list[ClientPartition]:
    scheme = config.split_scheme
    num_classes = domain.num_classes
    if scheme == "dirichlet":
        return _split_dirichlet(domain, config, first_id)
    if scheme == "fedotp":
        blocks = fedotp_class_blocks(num_classes, config.num_clients, config.class_seed)
    else:
        blocks = fedtpg_class_chunks(num_classes, config.classes_per_client)
        if config.num_clients is not None and config.num_clients != len(blocks):
            raise ValueError(
                f"fedtpg derives {len(blocks)} clients from {num_classes} classes of {domain.name!r} in chunks of "
                f"{config.classes_per_client}, but num_clients={config.num_clients}; leave --clients unset "
                "or change --classes-per-client"
            )
    clients = []
    for offset, block in enumerate(blocks):
        labels = tuple(sorted(block))
        members = set(labels)
        train = [item for item in domain.train if item.label in members]
        test = [item for item in domain.test if item.label in members]
        clients.append(_client(first_id + offset, domain, labels, train, test, config))
    return clients


def _split_dirichlet(domain: DatasetSplits, config: PartitionConfig, first_id: int) -> list[ClientPartition]:
    num_clients = config.num_clients
    rng = np.random.default_rng([config.seed, first_id])
    parts = dirichlet_label_split([item.label for item in domain.train], num_clients, config.alpha, rng,
                                  min_size=config.min_train_size)
    full_train = [[domain.train[i] for i in part] for part in parts]
    counts = [_label_counts(items) for items in full_train]
    tests = divide_test_by_share(domain.test, counts, random.Random(f"{config.seed}:test:{first_id}"))
    clients = []
    for offset, (train, test) in enumerate(zip(full_train, tests)):
        client = _client(first_id + offset, domain, (), train, test, config)
        labels = tuple(sorted({item.label for item in client.train}))
        clients.append(dataclasses.replace(client, labels=labels))
    return clients


def _client(client_id: int, domain: DatasetSplits, labels: tuple[int, ...], train: list[Datum], test: list[Datum],
            config: PartitionConfig) -> ClientPartition:
    if config.shots is not None:
        train = sample_fewshot(train, config.shots, random.Random(f"{config.seed}:{client_id}"))
    return ClientPartition(client_id=client_id, dataset=domain.name, labels=labels, train=tuple(train), test=tuple(test))


def _label_counts(items: Sequence[Datum]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for item in items:
        counts[item.label] = counts.get(item.label, 0) + 1
    return counts

"""Federated prompt learning: settings, published protocol defaults, and the client and server
computations that the Flower apps in :mod:`strategies.fl_apps` call.

This module does not import Flower. A client round is :func:`local_train` (the same
:class:`~strategies.prompt_strategy.PromptStrategy` and learner as the paper protocols, run on the
client's partition for the local epochs) and :func:`local_evaluate`; the server's evaluation of
the global prompt is :func:`evaluate_global`. Only the learnable state a method declares global
(:meth:`~learners.PromptLearner.split_state`) leaves a client; the local part (personalized
prompts, ``local_state_prefixes``) stays with it.

The learning rate follows one Dassl schedule over the whole federation: round r, local epoch e
runs at the LR of global epoch ``(r - 1) * local_epochs + e`` out of ``rounds * local_epochs``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from benchmarks import DatasetSplits, Datum, ImageListDataset, build_digits, build_transform, read_dataset
from benchmarks.partitions import (
    BASE_SCHEMES,
    FEDOTP_CLASS_SEED,
    FEDTPG_CLASSES_PER_CLIENT,
    PARTITION_SCHEMES,
    FederatedPartition,
    PartitionConfig,
    build_partition,
)
from benchmarks.streams import make_experience
from learners import ClassSet, ClipBackbone, PromptLearner, TrainConfig, get_method, parse_overrides
from learners.config import config_to_dict
from plugins.proximal import ProximalTermPlugin

from .experiment import (
    RESULT_NEUTRAL_TRAIN_FIELDS,
    RunSettings,
    evaluate,
    feature_cache,
    get_backbone,
    harmonic_mean,
    section_differences,
    seed_everything,
    training_plugins,
)
from .prompt_strategy import PromptStrategy

logger = logging.getLogger(__name__)

PROTOCOL = "federated"

# Keys of Flower records, written once here (the strategies, apps and tests share them).
NUM_EXAMPLES_KEY = "num-examples"
"""Weighting key of every reply: train images in train replies, test images in evaluate replies."""
TRAIN_LOSS_KEY = "train-loss"
LOCAL_ACCURACY_KEY = "local-accuracy"
PARTITION_ID_KEY = "partition-id"
PARTITION_DIGEST_KEY = "partition-digest"
SERVER_ROUND_KEY = "server-round"
PROXIMAL_MU_KEY = "proximal-mu"
"""Set by Flower's FedProx in the train config; clients then add (mu / 2) * ||w - w_global||^2."""

CLIENT_CLASSES = ("own", "all")

UNCOMPARED_RUN_CONFIG_KEYS = frozenset({"data-root", "cache-dir", "output-dir", "client-state-dir", "device", "resume"})
"""Run-config keys that may differ from those of the checkpoint a run resumes or the results it
reuses: paths, the device and the resume switch. The same data on another path or device gives
comparable results, and a resume also compares the partition digest, which catches changed data."""


# ---------------------------------------------------------------------------------------------
# Published protocols


@dataclass(frozen=True)
class ProtocolDefaults:
    """Training and partition defaults of one published federated prompt-learning protocol.

    Attributes:
        source: The paper or script the values come from.
        clients: Clients per dataset, or None where the scheme derives the count.
        alpha: Dirichlet concentration (Dirichlet splits only).
        batch_size: Train batch size, or None for "batch = shots" (FedOTP and FedPGP scripts).
        n_ctx: Context length applied to methods whose config has ``n_ctx``, with random
            context initialization (``ctx_init=None``) as in the federated papers.
        client_classes: ``own`` scores a client's images over its own classes (FedTPG's and
            FedPGP's Local accuracy); ``all`` over every class of its dataset (FedOTP).
    """

    source: str
    rounds: int
    local_epochs: int
    shots: int
    lr: float
    n_ctx: int
    client_classes: str
    clients: int | None = 10
    alpha: float | None = None
    fraction: float = 1.0
    batch_size: int | None = 32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0


_PROMPTFOLIO = ProtocolDefaults(
    source=(
        "PromptFolio (arXiv 2409.19610): Dir(0.3) over 10 clients, 10 rounds, n_ctx 8, 16 shots, batch 16, "
        "SGD lr 0.001; 1 local epoch as in FLiP's reference run (arXiv 2503.22263)"
    ),
    clients=10, alpha=0.3, rounds=10, local_epochs=1, shots=16, batch_size=16, lr=0.001, n_ctx=8,
    client_classes="all",
)
_FEDTPG = ProtocolDefaults(
    source=(
        "FedTPG cross-class (arXiv 2310.06123): 20 classes per client, 8 shots, n_ctx 4, 500 rounds, "
        "1 local epoch, SGD lr 0.003, momentum 0.9, weight decay 1e-5, cosine, batch 200, full participation"
    ),
    clients=None, rounds=500, local_epochs=1, shots=8, batch_size=200, lr=0.003, weight_decay=1e-5, n_ctx=4,
    client_classes="own",
)

PROTOCOL_DEFAULTS: dict[str, ProtocolDefaults] = {
    "dirichlet": _PROMPTFOLIO,
    "fedotp": ProtocolDefaults(
        source=(
            "FedOTP few-shot script (arXiv 2403.00041): 10 clients, 10 rounds, 1 local epoch, SGD lr 0.001, "
            "batch = shots, n_ctx 16; 16 shots, the largest of its 1/2/4/8/16 sweep"
        ),
        rounds=10, local_epochs=1, shots=16, batch_size=None, lr=0.001, n_ctx=16, client_classes="all",
    ),
    "fedtpg": _FEDTPG,
    "multidomain": ProtocolDefaults(
        source=(
            "no published CLIP prompt protocol with one dataset per client; PromptFL's script settings "
            "(arXiv 2208.11625): 20 rounds, 5 local epochs, SGD lr 0.001 after 1 warm-up epoch at 1e-5, "
            "batch 32, n_ctx 16, here with 16 shots"
        ),
        clients=None, rounds=20, local_epochs=5, shots=16, batch_size=32, lr=0.001, warmup_epochs=1, n_ctx=16,
        client_classes="all",
    ),
    "base2novel/fedtpg": _FEDTPG,
    "base2novel/fedotp": ProtocolDefaults(
        source=(
            "FedPGP base-to-novel script (arXiv 2405.09771): base classes split disjointly over 10 clients, "
            "25 rounds, 2 local epochs, SGD lr 0.001, batch = shots, 16 shots, n_ctx 16"
        ),
        rounds=25, local_epochs=2, shots=16, batch_size=None, lr=0.001, n_ctx=16, client_classes="own",
    ),
    "base2novel/dirichlet": dataclasses.replace(
        _PROMPTFOLIO, source="no published base-to-novel Dirichlet protocol; " + _PROMPTFOLIO.source
    ),
}


def protocol_defaults(partition: str, base_scheme: str) -> ProtocolDefaults:
    """Return the defaults of a partition scheme (and of the base scheme under ``base2novel``)."""
    return PROTOCOL_DEFAULTS[f"base2novel/{base_scheme}" if partition == "base2novel" else partition]


# ---------------------------------------------------------------------------------------------
# Settings and the Flower run-config adapter


@dataclass(frozen=True)
class FederatedSettings:
    """One federated run as the user asked for it; None fields take the protocol's default.

    The same settings travel as Flower run config: :meth:`to_run_config` and
    :meth:`from_run_config` map them to kebab-case scalar keys (``local-epochs``, ``dataset`` as
    a comma-separated list, ``set`` for the ``--set`` overrides).

    Attributes:
        datasets: One dataset, or several for ``multidomain`` and ``base2novel``.
        shots: Train images per class per client; 0 keeps every image, None the protocol's.
        fraction: Fraction of clients sampled for training per round.
        fraction_evaluate: Fraction of clients that report local (personalized) accuracy.
        client_classes: ``own`` or ``all``; see :class:`ProtocolDefaults`.
        strategy: Flower strategy name (``fedavg``, ``fedprox``, ``fedadam``...).
        strategy_options: Space-separated ``key=value`` arguments of the strategy class.
        failure_tolerance: Largest fraction of sampled clients that may fail in a round for the
            round to be aggregated from the others.
        round_timeout: Seconds the server waits for the replies of one round.
        eval_every: Server-side evaluation every this many rounds (always after the last).
        overrides: ``--set`` pairs, space-separated, e.g. ``"n_ctx=16 train.lr=0.01"``.
        data_root / cache_dir: Empty for the defaults ($VLPROMPT_DATA, $VLPROMPT_CACHE).
        client_state_dir: Folder where each client also writes its local state, so that a
            resumed run finds it after the client process died. A path on the client's machine
            (a SuperNode may set it in its node config); empty keeps the state in the client's
            Flower Context only. ``run_benchmark.py federated`` sets it inside the run folder.
        resume: Continue from the run folder's round checkpoint (``resume.pt``) if there is one.
    """

    method: str = "coop"
    datasets: tuple[str, ...] = ("digits",)
    partition: str = "dirichlet"
    base_scheme: str = "fedtpg"
    clients: int | None = None
    alpha: float | None = None
    classes_per_client: int | None = None
    class_seed: int = FEDOTP_CLASS_SEED
    shots: int | None = None
    rounds: int | None = None
    local_epochs: int | None = None
    fraction: float | None = None
    fraction_evaluate: float = 1.0
    batch_size: int | None = None
    lr: float | None = None
    client_classes: str | None = None
    strategy: str = "fedavg"
    strategy_options: str = ""
    failure_tolerance: float = 0.5
    round_timeout: float = 86400.0
    eval_every: int = 1
    overrides: str = ""
    seed: int = 1
    model: str = "toy-clip"
    pretrained: str = "digits"
    device: str = "cpu"
    precision: str = "fp32"
    data_root: str = ""
    cache_dir: str = ""
    client_state_dir: str = ""
    output_dir: str = "runs"
    on_bad_image: str = "raise"
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            object.__setattr__(self, "datasets", tuple(d.strip() for d in self.datasets.split(",") if d.strip()))
        if not self.datasets:
            raise ValueError("a federated run needs at least one dataset")

        if self.partition not in PARTITION_SCHEMES:
            raise ValueError(f"--partition must be one of {list(PARTITION_SCHEMES)}, got {self.partition!r}")
        if self.base_scheme not in BASE_SCHEMES:
            raise ValueError(f"--base-scheme must be one of {list(BASE_SCHEMES)}, got {self.base_scheme!r}")
        if self.partition not in ("multidomain", "base2novel") and len(self.datasets) != 1:
            raise ValueError(
                f"partition {self.partition!r} federates one dataset, got {list(self.datasets)}; "
                "use multidomain or base2novel to federate several"
            )

        if self.client_classes is not None and self.client_classes not in CLIENT_CLASSES:
            raise ValueError(f"--client-classes must be 'own' or 'all', got {self.client_classes!r}")
        for name in ("clients", "rounds", "local_epochs", "batch_size", "classes_per_client"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.shots is not None and self.shots < 0:
            raise ValueError(f"shots must be >= 0 (0 keeps every image), got {self.shots!r}")

        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction!r}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise ValueError(f"--fraction-evaluate must be in [0, 1], got {self.fraction_evaluate!r}")
        if not 0 <= self.failure_tolerance < 1:
            raise ValueError(
                f"--failure-tolerance must be in [0, 1), got {self.failure_tolerance!r}; a round needs at least one reply"
            )
        if self.round_timeout <= 0:
            raise ValueError(f"--round-timeout must be > 0 seconds, got {self.round_timeout!r}")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {self.eval_every!r}")

    # -- run config -------------------------------------------------------------------------

    def to_run_config(self) -> dict[str, str | int | float]:
        """Flower run config: kebab-case keys, scalar values; None and empty fields left out.

        Empty strings are left out because flwr 1.42's ``ConfigRecord.count_bytes`` rejects them;
        :meth:`from_run_config` restores the same defaults from the missing keys.
        """
        config: dict[str, str | int | float] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None or value == "":
                continue
            config[_run_config_key(item.name)] = ",".join(value) if isinstance(value, tuple) else value
        return config

    @classmethod
    def from_run_config(cls, values: Mapping[str, Any], strict: bool = True) -> "FederatedSettings":
        """Build settings from a Flower run config (or a train ``ConfigRecord``).

        Args:
            values: kebab-case keys as written by :meth:`to_run_config` or pyproject.toml.
            strict: Reject keys that are no settings (a typo in pyproject.toml); a message
                config also carries Flower's keys (``server-round``...), read with False.

        Raises:
            ValueError: An unknown key (strict), or a value of the wrong type.
        """
        hints = typing.get_type_hints(cls)
        fields = {_run_config_key(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if strict and unknown:
            raise ValueError(f"unknown run config keys {unknown}; valid keys: {sorted(fields)}")
        kwargs = {}
        for key, name in fields.items():
            if key in values:
                kwargs[name] = _convert_run_config_value(key, values[key], hints[name])
        return cls(**kwargs)

    @property
    def dataset(self) -> str:
        """The datasets joined with "+", the name of the run folder level."""
        return "+".join(self.datasets)

    def stored_differences(self, results: Mapping[str, Any]) -> list[str]:
        """List what this run would use that a finished run's ``results.json`` did not: every run-config
        value but paths, device and the resume switch, and the resolved method and train configs."""
        stored = results.get("config", {}) if isinstance(results.get("config"), dict) else {}
        requested = {k: v for k, v in self.to_run_config().items() if k not in UNCOMPARED_RUN_CONFIG_KEYS}
        stored_run = {k: v for k, v in (stored.get("federated") or {}).items() if k not in UNCOMPARED_RUN_CONFIG_KEYS}
        differences = [
            f"{key}: stored {stored_run.get(key, 'default')!r}, requested {requested.get(key, 'default')!r}"
            for key in sorted(set(stored_run) | set(requested)) if stored_run.get(key) != requested.get(key)
        ]
        plan = resolve_plan(self)
        differences += section_differences("method", stored.get("method"), config_to_dict(plan.method_config))
        differences += section_differences("train", stored.get("train"), config_to_dict(plan.train_config),
                                           ignore=RESULT_NEUTRAL_TRAIN_FIELDS)
        return differences

    def run_settings(self) -> RunSettings:
        """The single-run settings of the shared helpers (backbone cache, method registry)."""
        return RunSettings(
            method=self.method,
            dataset=self.datasets[0],
            seed=self.seed,
            data_root=Path(self.data_root) if self.data_root else None,
            output_dir=Path(self.output_dir),
            model=self.model,
            pretrained=self.pretrained,
            device=self.device,
            precision=self.precision,
            cache_dir=Path(self.cache_dir) if self.cache_dir else None,
            progress=False,
            on_bad_image=self.on_bad_image,
        )


_RUN_CONFIG_RENAMES = {"datasets": "dataset", "overrides": "set"}


def _run_config_key(field_name: str) -> str:
    return _RUN_CONFIG_RENAMES.get(field_name, field_name.replace("_", "-"))


def _convert_run_config_value(key: str, value: Any, annotation: Any) -> Any:
    options = typing.get_args(annotation) if typing.get_origin(annotation) is not None else (annotation,)
    if type(None) in options and value in ("", None):
        return None
    if tuple in (typing.get_origin(o) for o in options) or annotation is tuple:
        return tuple(v.strip() for v in str(value).split(",") if v.strip())
    if bool in options:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise ValueError(f"run config key {key!r}: expected true or false, got {value!r}")
    for kind in (int, float, str):
        if kind in options:
            if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
                break
            try:
                return kind(value)
            except (TypeError, ValueError):
                break
    raise ValueError(f"run config key {key!r}: cannot use {value!r} as {annotation}")


# ---------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class FederatedPlan:
    """Settings with every protocol default filled in: what server and clients both execute.

    Attributes:
        settings: The user's settings.
        defaults: The protocol whose defaults were applied.
        partition: The partition config (client count, alpha, shots...).
        rounds / local_epochs / fraction / client_classes: Resolved values.
        method_config / train_config: The learner's config and the client optimizer settings;
            ``train_config.epochs`` is ``rounds * local_epochs`` (the LR schedule's length).
    """

    settings: FederatedSettings
    defaults: ProtocolDefaults
    partition: PartitionConfig
    rounds: int
    local_epochs: int
    fraction: float
    client_classes: str
    method_config: Any
    train_config: TrainConfig


def resolve_plan(settings: FederatedSettings) -> FederatedPlan:
    """Fill the protocol defaults in, then apply the user's values and ``--set`` overrides.

    Raises:
        ValueError: Unknown method or override key, or ``train.epochs`` in ``--set`` (the
            schedule length is ``rounds * local_epochs``).
    """
    defaults = protocol_defaults(settings.partition, settings.base_scheme)
    spec = get_method(settings.method)
    pairs = settings.overrides.split()
    overrides = parse_overrides(pairs, {"method": spec.config_class, "train": TrainConfig}) if pairs else {"method": {}, "train": {}}
    if "epochs" in overrides["train"]:
        raise ValueError("train.epochs is set by --rounds and --local-epochs in federated runs; remove it from --set")

    rounds = settings.rounds or defaults.rounds
    local_epochs = settings.local_epochs or defaults.local_epochs
    shots = defaults.shots if settings.shots is None else (settings.shots or None)
    derived_clients = settings.partition in ("multidomain", "fedtpg") or (
        settings.partition == "base2novel" and settings.base_scheme == "fedtpg"
    )
    if settings.clients is not None:
        num_clients = settings.clients
    else:
        num_clients = None if derived_clients else defaults.clients
    partition = PartitionConfig(
        scheme=settings.partition,
        num_clients=num_clients,
        # Only Dirichlet splits read alpha; the others keep a valid placeholder.
        alpha=settings.alpha if settings.alpha is not None else (defaults.alpha or _PROMPTFOLIO.alpha),
        classes_per_client=settings.classes_per_client or FEDTPG_CLASSES_PER_CLIENT,
        class_seed=settings.class_seed,
        base_scheme=settings.base_scheme,
        shots=shots,
        seed=settings.seed,
    )

    method_fields = {f.name for f in dataclasses.fields(spec.config_class)}
    method_values: dict[str, Any] = {}
    if "n_ctx" in method_fields:
        method_values["n_ctx"] = defaults.n_ctx
    if "ctx_init" in method_fields:
        method_values["ctx_init"] = None
    method_values.update(overrides["method"])
    method_config = spec.config_class(**method_values)

    batch_size = settings.batch_size or defaults.batch_size or shots or 32
    train_values: dict[str, Any] = {
        "epochs": rounds * local_epochs,
        "batch_size": batch_size,
        "optimizer": "sgd",
        "lr": settings.lr if settings.lr is not None else defaults.lr,
        "momentum": defaults.momentum,
        "weight_decay": defaults.weight_decay,
        "scheduler": "cosine",
        "warmup_epochs": defaults.warmup_epochs,
    }
    train_values.update(overrides["train"])
    train_config = dataclasses.replace(spec.train_defaults, **train_values)
    return FederatedPlan(
        settings=settings,
        defaults=defaults,
        partition=partition,
        rounds=rounds,
        local_epochs=local_epochs,
        fraction=settings.fraction if settings.fraction is not None else defaults.fraction,
        client_classes=settings.client_classes or defaults.client_classes,
        method_config=method_config,
        train_config=train_config,
    )


def results_path(settings: FederatedSettings) -> Path:
    """Return the ``results.json`` path of the run (reads the datasets to count the clients)."""
    plan = resolve_plan(settings)
    return run_dir(plan, load_partition(plan).num_clients) / "results.json"


def run_dir(plan: FederatedPlan, num_clients: int) -> Path:
    """``OUTPUT/federated/DATASETS/METHOD/TAG/seedS``.

    TAG is ``PARTITION[-BASE][-aALPHA]-cN[-fFRACTION]-STRATEGY-sSHOTS-rROUNDSeEPOCHS``, so runs
    that differ in these settings never count as each other's complete results. Other settings
    (``--lr``, ``--set``) are not in the name.
    """
    settings = plan.settings
    tag = settings.partition
    if settings.partition == "base2novel":
        tag += f"-{settings.base_scheme}"
    if plan.partition.split_scheme == "dirichlet":
        tag += f"-a{plan.partition.alpha:g}"
    tag += f"-c{num_clients}"
    if plan.fraction < 1:
        tag += f"-f{plan.fraction:g}"
    shots = plan.partition.shots if plan.partition.shots is not None else "all"
    tag += f"-{settings.strategy}-s{shots}-r{plan.rounds}e{plan.local_epochs}"
    return Path(settings.output_dir) / PROTOCOL / settings.dataset / settings.method / tag / f"seed{settings.seed}"


# ---------------------------------------------------------------------------------------------
# Partitions (cached per process, rebuilt identically by every client)


_PARTITIONS: dict[tuple[Any, ...], FederatedPartition] = {}


def load_partition(plan: FederatedPlan) -> FederatedPartition:
    """Return the federation of ``plan``, read and split once per process.

    Every process (server, each simulation actor, each SuperNode) builds the same partition
    from the same files and seeds. The server sends its digest, so a client can check it.
    """
    run = plan.settings.run_settings()
    data_root = run.resolved_data_root()
    key = (plan.settings.datasets, str(data_root), plan.partition)
    if key not in _PARTITIONS:
        if "digits" in plan.settings.datasets:
            build_digits(data_root)  # the built-in dataset is written on first use
        splits = [read_dataset(name, data_root) for name in plan.settings.datasets]
        partition = build_partition(splits, plan.partition)
        if partition.num_clients == 1:
            fixes = {"fedtpg": "lower --classes-per-client", "multidomain": "list more --dataset names"}
            logger.warning(
                "the %s partition of %s has a single client, so the run is centralized training; %s",
                plan.settings.partition, plan.settings.dataset, fixes.get(plan.partition.split_scheme, "raise --clients"),
            )
        _PARTITIONS[key] = partition
    return _PARTITIONS[key]


@dataclass(frozen=True)
class ClientData:
    """Train and test sets of one client, with labels in the learner's class set."""

    classes: ClassSet
    train: ImageListDataset
    test: ImageListDataset


def client_data(plan: FederatedPlan, partition: FederatedPartition, client_id: int, image_size: int) -> ClientData:
    """Build the client's datasets, scored over its own classes or all classes of its dataset."""
    if not 0 <= client_id < partition.num_clients:
        raise ValueError(
            f"partition-id {client_id} is out of range for a federation of {partition.num_clients} clients; "
            f"start {partition.num_clients} SuperNodes with partition-id 0..{partition.num_clients - 1}"
        )
    client = partition.clients[client_id]
    domain = partition.domains[client.dataset]
    train, test = list(client.train), list(client.test)
    if plan.client_classes == "own":
        names = [domain.classnames[label] for label in client.labels]
        relabel = {label: index for index, label in enumerate(client.labels)}
        train, test = _relabel(train, relabel), _relabel(test, relabel)
    else:
        names = list(domain.classnames)
    on_error = plan.settings.on_bad_image
    return ClientData(
        classes=ClassSet(tuple(names), domain.template, domain.name),
        train=ImageListDataset(train, domain.image_root, build_transform(image_size, train=True, dataset=domain.name), on_error=on_error),
        test=ImageListDataset(test, domain.image_root, build_transform(image_size, train=False), on_error=on_error),
    )


def _relabel(items: list[Datum], relabel: Mapping[int, int]) -> list[Datum]:
    return [Datum(item.impath, relabel[item.label], item.classname) for item in items]


# ---------------------------------------------------------------------------------------------
# Learners and state


def derive_seed(*parts: int) -> int:
    """Derive a 31-bit seed from integers (run seed, round, client), stable across processes."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def federated_backbone(settings: FederatedSettings) -> ClipBackbone:
    """This process's frozen backbone, built on first use right after seeding with the run seed.

    With ``--pretrained none`` the weights are random, and the seed makes the server and every
    client process build the same ones.

    NOTE: a process whose first ``get_backbone`` call for these settings came from elsewhere
    (unseeded) has other random weights. Pretrained weights are unaffected.
    """
    seed_everything(settings.seed)
    return get_backbone(settings.run_settings())


def build_learner(plan: FederatedPlan) -> PromptLearner:
    """Build a fresh learner on this process's cached backbone, initialized from the run seed.

    Every process builds the same initial state, so a client's local (personalized) state
    starts where the server's copy does.
    """
    settings = plan.settings
    backbone = federated_backbone(settings)
    seed_everything(settings.seed)
    return get_method(settings.method).learner_class(backbone, plan.method_config).to(settings.device)


def global_keys(learner: PromptLearner) -> list[str]:
    """Names of the learnable state that travels (everything but ``local_state_prefixes``)."""
    shared, _ = learner.split_state()
    return sorted(shared)


def load_round_state(learner: PromptLearner, global_state: Mapping[str, Tensor],
                     local_state: Mapping[str, Tensor] | None) -> None:
    """Load the server's global state and the client's own local state (strictly).

    Keys missing from both keep the learner's initial values (the local state before a
    client's first round).

    Raises:
        ValueError: The server sent a local key, or a key or shape the learner does not have.
    """
    shared, local = learner.split_state()
    leaked = sorted(set(global_state) & set(local))
    if leaked:
        raise ValueError(f"the global state contains local keys {leaked}; local state must never leave a client")
    state = {**shared, **local}
    state.update(global_state)
    if local_state:
        state.update(local_state)
    learner.load_learnable_state_dict(state, strict=True)


@dataclass(frozen=True)
class ClientUpdate:
    """Result of one client round.

    Attributes:
        global_state: The learnable state that travels back to the server.
        local_state: The state that stays on the client (empty for fully global methods).
        num_examples: Train images used (FedAvg's weight).
        loss_terms: Mean loss terms of the last local epoch (``loss`` is their sum).
    """

    global_state: dict[str, Tensor]
    local_state: dict[str, Tensor]
    num_examples: int
    loss_terms: dict[str, float]


def _strategy(plan: FederatedPlan, learner: PromptLearner, plugins: list | None = None) -> PromptStrategy:
    settings = plan.settings
    strategy = PromptStrategy(
        learner=learner,
        train_config=plan.train_config,
        device=settings.device,
        precision=settings.precision,
        plugins=[*training_plugins(learner, plan.method_config), *(plugins or [])],
        progress=False,
    )
    # The server and every client evaluate the same test images each round: for a learner
    # without image prompts they are encoded once and read from the cache folder afterwards.
    # Local training reads images.
    strategy.feature_cache = feature_cache(settings.run_settings(), plan.train_config, learner.backbone)
    return strategy


def local_train(plan: FederatedPlan, partition: FederatedPartition, client_id: int, global_state: Mapping[str, Tensor],
                local_state: Mapping[str, Tensor] | None, server_round: int, proximal_mu: float = 0.0) -> ClientUpdate:
    """Train one client for ``local_epochs`` on its partition, starting from the global state.

    Args:
        plan: The resolved run.
        partition: The federation (see :func:`load_partition`).
        client_id: The client's ``partition-id``.
        global_state: The server's global state (global keys only).
        local_state: The client's state from its previous round, or None before its first.
        server_round: 1-based round; sets the position in the LR schedule.
        proximal_mu: FedProx's mu; > 0 adds ``(mu / 2) * ||w - w_global||^2`` as the ``prox`` term.

    Returns:
        The updated global and local state, the number of train images and the loss terms.
    """
    learner = build_learner(plan)
    data = client_data(plan, partition, client_id, learner.backbone.image_size)
    learner.set_classnames(data.classes)
    load_round_state(learner, global_state, local_state)

    plugins = []
    if proximal_mu > 0:
        plugins.append(ProximalTermPlugin(proximal_mu, {k: v for k, v in global_state.items()}))
    # NOTE: the optimizer (SGD momentum) starts fresh every round; its state is not kept between
    # a client's rounds.
    strategy = _strategy(plan, learner, plugins)
    strategy.start_epoch = (server_round - 1) * plan.local_epochs
    strategy.train_epochs = plan.local_epochs
    seed_everything(derive_seed(plan.settings.seed, server_round, client_id))
    batch_size = plan.train_config.batch_size
    strategy.train(make_experience(data.train), num_workers=plan.train_config.num_workers,
                   drop_last=len(data.train) >= batch_size)

    last = strategy.epoch_history()[-1]
    shared, local = learner.split_state()
    terms = {k: float(v) for k, v in last.items() if k not in ("epoch", "lr")}
    return ClientUpdate(global_state=shared, local_state=local, num_examples=len(data.train), loss_terms=terms)


def local_evaluate(plan: FederatedPlan, partition: FederatedPartition, client_id: int,
                   global_state: Mapping[str, Tensor], local_state: Mapping[str, Tensor] | None) -> dict[str, Any]:
    """Personalized accuracy: the global state plus the client's local state on its own test set.

    Returns:
        ``accuracy`` (percent, NaN for an empty test set), ``correct`` and ``total``.
    """
    learner = build_learner(plan)
    data = client_data(plan, partition, client_id, learner.backbone.image_size)
    learner.set_classnames(data.classes)
    load_round_state(learner, global_state, local_state)
    if len(data.test) == 0:
        return {"accuracy": float("nan"), "correct": 0, "total": 0}
    result = evaluate(_strategy(plan, learner), learner, data.classes, data.test)
    return {"accuracy": result["accuracy"], "correct": result["correct"], "total": result["total"]}


def evaluate_global(plan: FederatedPlan, partition: FederatedPartition,
                    global_state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Server-side accuracy of the global state on each dataset's test set.

    Local keys keep their initial values. Every dataset is scored over all of its classes
    (``accuracy``). Under ``base2novel``, its base test images are also scored over the base
    classes and its novel test images over the novel classes. Summary values average over
    datasets, and ``hm`` is the harmonic mean of the averaged base and novel accuracies.

    Returns:
        ``global_accuracy`` and ``per_dataset``, plus ``base_accuracy``, ``novel_accuracy`` and
        ``hm`` for ``base2novel``.
    """
    learner = build_learner(plan)
    load_round_state(learner, global_state, None)
    strategy = _strategy(plan, learner)
    size = learner.backbone.image_size
    transform = build_transform(size, train=False)
    on_error = plan.settings.on_bad_image

    def accuracy(splits: DatasetSplits, test: tuple[Datum, ...], classnames: tuple[str, ...]) -> float:
        classes = ClassSet(classnames, splits.template, splits.name)
        dataset = ImageListDataset(test, splits.image_root, transform, on_error=on_error)
        return evaluate(strategy, learner, classes, dataset)["accuracy"]

    per_dataset: dict[str, dict[str, float]] = {}
    for name, domain in partition.domains.items():
        if name in partition.novel:
            novel = partition.novel[name]
            everything = _merge_base_novel(domain, novel)
            per_dataset[name] = {
                "accuracy": accuracy(everything, everything.test, everything.classnames),
                "base_accuracy": accuracy(domain, domain.test, domain.classnames),
                "novel_accuracy": accuracy(novel, novel.test, novel.classnames),
            }
        else:
            per_dataset[name] = {"accuracy": accuracy(domain, domain.test, domain.classnames)}

    def mean(key: str) -> float:
        values = [v[key] for v in per_dataset.values()]
        return sum(values) / len(values)

    result: dict[str, Any] = {"global_accuracy": mean("accuracy"), "per_dataset": per_dataset}
    if partition.novel:
        result["base_accuracy"] = mean("base_accuracy")
        result["novel_accuracy"] = mean("novel_accuracy")
        result["hm"] = harmonic_mean(result["base_accuracy"], result["novel_accuracy"])
    return result


def _merge_base_novel(base: DatasetSplits, novel: DatasetSplits) -> DatasetSplits:
    """Base and novel halves as one label space: base labels first, novel labels after them."""
    offset = len(base.classnames)
    test = base.test + tuple(Datum(d.impath, d.label + offset, d.classname) for d in novel.test)
    return dataclasses.replace(base, train=(), val=(), test=test, classnames=base.classnames + novel.classnames)

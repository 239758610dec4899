"""One protocol run from resolved settings to ``results.json``: the glue between the layers.

``run_benchmark.py`` parses the command line into a :class:`RunSettings` and calls a protocol
runner from :mod:`strategies.protocols`; sweeps call it once per (method, dataset, seed).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from benchmarks import ImageListDataset, default_data_root
from learners import ClassSet, ClipBackbone, PromptLearner, TrainConfig, get_method, load_backbone
from learners.config import config_to_dict, json_ready
from plugins.gpa import gpa_plugins
from plugins.prototypes import prototype_plugins

from .feature_cache import FeatureCache, eval_experience
from .pretrain import DIGITS_MODEL, DIGITS_TAG, default_cache_dir, ensure_digits_weights
from .prompt_strategy import PromptStrategy

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = 1


@dataclass(frozen=True)
class RunSettings:
    """Everything one run needs, already validated by the command line.

    Attributes:
        method_overrides / train_overrides: ``--set`` values for the method and train configs.
        epochs / batch_size: shortcuts for the train config (None keeps the method default).
    """

    method: str = "coop"
    dataset: str = "digits"
    seed: int = 1
    shots: int | None = 16
    data_root: Path | None = None
    output_dir: Path = Path("runs")
    model: str = DIGITS_MODEL
    pretrained: str = DIGITS_TAG
    device: str = "cpu"
    precision: str = "fp32"
    epochs: int | None = None
    batch_size: int | None = None
    method_overrides: Mapping[str, Any] = field(default_factory=dict)
    train_overrides: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    on_bad_image: str = "raise"

    def resolved_data_root(self) -> Path:
        return Path(self.data_root) if self.data_root is not None else default_data_root()

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_BACKBONES: dict[tuple[str, str, str], ClipBackbone] = {}


def get_backbone(settings: RunSettings) -> ClipBackbone:
    """The frozen backbone for these settings, built once per process and shared."""
    pretrained = settings.pretrained
    if pretrained == DIGITS_TAG:
        if settings.model != DIGITS_MODEL:
            raise ValueError(
                f"--pretrained {DIGITS_TAG} provides weights for --model {DIGITS_MODEL} only, got --model {settings.model!r}"
            )
        pretrained = str(ensure_digits_weights(settings.resolved_data_root(), settings.resolved_cache_dir()))
    key = (settings.model, pretrained, settings.device)
    if key not in _BACKBONES:
        backbone = load_backbone(settings.model, pretrained, device=settings.device)
        backbone.pretrained = settings.pretrained
        _BACKBONES[key] = backbone
    return _BACKBONES[key]


def resolve_configs(settings: RunSettings, dataset: str, shots: int | None = None,
                    protocol: str | None = None) -> tuple[Any, TrainConfig]:
    """Return the method and train configs of one run.

    Method config: published defaults, the dataset's overrides, the protocol's overrides and its
    per-dataset ones, then the user's ``--set``. Train config: published defaults, the few-shot
    epochs for ``shots``, the dataset's overrides, the protocol's, then the user's.

    Args:
        settings: the run; its method and user overrides are used.
        dataset: the dataset trained on ("" for none).
        shots: shot count that selects the method's few-shot epoch schedule, or None.
        protocol: a key of :data:`learners.registry.PROTOCOL_KEYS` whose published settings apply,
            or None for none.
    """
    spec = get_method(settings.method)
    protocol_values = spec.protocol_overrides.get(protocol) if protocol is not None else None
    method_values = dict(spec.dataset_config_overrides.get(dataset, {}))
    if protocol_values is not None:
        method_values.update(protocol_values.method)
        method_values.update(protocol_values.dataset_method.get(dataset, {}))
    method_values.update(settings.method_overrides)
    method_config = spec.config_class(**method_values)
    train_values: dict[str, Any] = {}
    if shots is not None and shots in spec.fewshot_epochs:
        train_values["epochs"] = spec.fewshot_epochs[shots]
    # Dataset overrides win over the few-shot schedule: CoOp trains ImageNet for 50 epochs at
    # every shot count.
    train_values.update(spec.dataset_train_overrides.get(dataset, {}))
    if protocol_values is not None:
        train_values.update(protocol_values.train)
    train_values.update(settings.train_overrides)
    if settings.epochs is not None:
        train_values["epochs"] = settings.epochs
    if settings.batch_size is not None:
        train_values["batch_size"] = settings.batch_size
    return method_config, dataclasses.replace(spec.train_defaults, **train_values)


def training_plugins(learner: PromptLearner, method_config: Any) -> list:
    """Plugins that a learner or its config requests: prototype init (BIP), Gaussian prompt
    aggregation (configs with ``gpa_mean``, PromptSRC)."""
    return [*prototype_plugins(learner), *gpa_plugins(method_config)]


def feature_cache(settings: RunSettings, train_config: TrainConfig, backbone: ClipBackbone) -> FeatureCache | None:
    """The frozen image feature cache of a run under ``CACHE_DIR/features``, or None when off."""
    return FeatureCache.from_config(settings.resolved_cache_dir() / "features", backbone, train_config, settings.device)


def run_dir(settings: RunSettings, protocol: str) -> Path:
    """``OUTPUT/PROTOCOL/DATASET/METHOD[/shotsK]/seedS``; only few-shot runs have a shots level."""
    root = Path(settings.output_dir) / protocol / settings.dataset / settings.method
    if protocol == "fewshot":
        root = root / f"shots{settings.shots if settings.shots is not None else 'all'}"
    return root / f"seed{settings.seed}"


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def peak_memory() -> tuple[int, str]:
    """Peak memory in bytes and what was measured (CUDA allocations, else the process's max RSS)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_max_rss"


def evaluate(strategy: PromptStrategy, learner: PromptLearner, classes: ClassSet, dataset: ImageListDataset) -> dict[str, Any]:
    """Top-1 accuracy (percent) of ``learner`` on ``dataset`` scored over ``classes``."""
    learner.set_classnames(classes)
    start = time.perf_counter()
    eval_experience(strategy, dataset, num_workers=strategy.train_config.num_workers)
    seconds = time.perf_counter() - start
    plugin = strategy.accuracy
    return {
        "accuracy": plugin.accuracy,
        "correct": plugin.correct,
        "total": plugin.total,
        "seconds": seconds,
        "images_per_second": plugin.total / seconds if seconds > 0 else float("nan"),
    }


_COMPARED_RUN_FIELDS = ("precision", "shots", "seed", "model", "pretrained")

RESULT_NEUTRAL_TRAIN_FIELDS = frozenset({"num_workers", "eval_batch_size", "feature_cache_max_gb", "max_text_chunk",
                                         "text_checkpoint"})
"""Train fields that change speed or memory only, so finished results stay valid when they differ."""

PROTOCOL_CONFIG_KEYS = {"base2novel": "base2novel", "fewshot": "fewshot", "cross-dataset": "transfer",
                        "domain-generalization": "transfer"}
"""Command-line protocol -> the key of its published method settings (``MethodSpec.protocol_overrides``)."""


def section_differences(section: str, stored: Any, requested: Mapping[str, Any],
                        ignore: frozenset[str] = frozenset()) -> list[str]:
    """List ``"SECTION.KEY: stored X, requested Y"`` for every key of both that differs.

    Keys that a results file of an older version does not record are not compared.
    """
    if not isinstance(stored, Mapping):
        return []
    differences = []
    for key, value in requested.items():
        value = json_ready(value)
        if key in stored and key not in ignore and stored[key] != value:
            differences.append(f"{section}.{key}: stored {stored[key]!r}, requested {value!r}")
    return differences


def stored_config_differences(settings: RunSettings, results: Mapping[str, Any], protocol: str | None = None,
                              dataset: str | None = None) -> list[str]:
    """List what a run with ``settings`` would use that a finished run's ``results.json`` did not.

    Compares the run fields that change results (precision, shots, seed, model, weights) and the
    resolved method and train configs: published defaults, protocol and dataset settings, and
    the user's ``--set``, ``--epochs`` and ``--batch-size``. Train fields that change speed or
    memory only are not compared, nor are device and data root: the same data on another device
    or path gives comparable results.

    Args:
        settings: the requested run.
        results: the stored ``results.json`` payload.
        protocol: the command-line protocol, which selects published protocol settings and the
            few-shot epoch schedule.
        dataset: the dataset trained on; by default ``settings.dataset`` ("" for continual runs).

    Returns:
        One ``"field: stored X, requested Y"`` entry per difference (empty when they agree).
    """
    stored = results.get("config", {}) if isinstance(results.get("config"), dict) else {}
    differences = []
    stored_run = stored.get("run", {})
    requested_run = run_config_record(settings)
    for key in _COMPARED_RUN_FIELDS:
        if key in stored_run and stored_run[key] != requested_run[key]:
            differences.append(f"{key}: stored {stored_run[key]!r}, requested {requested_run[key]!r}")
    shots = settings.shots if protocol == "fewshot" else None
    method_config, train_config = resolve_configs(
        settings, settings.dataset if dataset is None else dataset, shots, PROTOCOL_CONFIG_KEYS.get(protocol or "")
    )
    differences += section_differences("method", stored.get("method"), config_to_dict(method_config))
    differences += section_differences("train", stored.get("train"), config_to_dict(train_config),
                                       ignore=RESULT_NEUTRAL_TRAIN_FIELDS)
    return differences


def run_config_record(settings: RunSettings) -> dict[str, Any]:
    """The run-level settings that results.json records under ``config.run``."""
    return {
        "data_root": str(settings.resolved_data_root()),
        "device": settings.device,
        "precision": settings.precision,
        "shots": settings.shots,
        "seed": settings.seed,
        "model": settings.model,
        "pretrained": settings.pretrained,
    }

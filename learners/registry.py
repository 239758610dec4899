"""The one method registry: name -> learner class, typed config class and training defaults.

Methods register themselves with :func:`register_method` in their own module, and
``learners/__init__.py`` imports every method module explicitly, so the registry is complete as
soon as ``learners`` is imported.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .config import TrainConfig

logger = logging.getLogger(__name__)


PROTOCOL_KEYS = ("base2novel", "fewshot", "transfer")
"""Protocols a method may publish its own settings for; ``transfer`` covers cross-dataset and
domain generalization, which train the same way on the source dataset."""


@dataclass(frozen=True)
class ProtocolOverrides:
    """A method's published settings for one protocol, applied over its base-to-novel defaults.

    Attributes:
        method: method config field overrides.
        train: TrainConfig field overrides. They win over the dataset overrides, because a
            protocol's config file replaces the whole schedule.
        dataset_method: dataset name -> method config overrides that hold in this protocol only.
        source: the reference config file the values come from.
    """

    method: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    dataset_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """Everything the harness needs to build and train one method.

    Attributes:
        name: registry name used on the command line.
        learner_class: the ``PromptLearner`` subclass.
        config_class: the method's frozen config dataclass.
        train_defaults: published base-to-novel training hyper-parameters.
        dataset_train_overrides: dataset name -> TrainConfig field overrides (ImageNet epochs...).
        dataset_config_overrides: dataset name -> method config overrides (CoPrompt's table).
        fewshot_epochs: shots -> epochs for the few-shot protocol, where the reference differs.
        protocol_overrides: protocol (one of ``PROTOCOL_KEYS``) -> the settings the reference
            publishes for it (MaPLe's cross-dataset config, PromptSRC's few-shot config).
        citation: paper title and link.
    """

    name: str
    learner_class: type
    config_class: type
    train_defaults: TrainConfig
    dataset_train_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    dataset_config_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fewshot_epochs: Mapping[int, int] = field(default_factory=dict)
    protocol_overrides: Mapping[str, ProtocolOverrides] = field(default_factory=dict)
    citation: str = ""


_METHODS: dict[str, MethodSpec] = {}
_DEPRECATED: dict[str, str] = {"independent_vl": "ivlp", "plot++": "plotpp", "zsclip": "zeroshot"}


def register_method(
    name: str,
    config_class: type,
    train_defaults: TrainConfig,
    dataset_train_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    dataset_config_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    fewshot_epochs: Mapping[int, int] | None = None,
    protocol_overrides: Mapping[str, ProtocolOverrides] | None = None,
    citation: str = "",
) -> Callable[[type], type]:
    """Class decorator that registers a prompt learner under ``name``.

    Raises:
        ValueError: ``protocol_overrides`` names a protocol outside ``PROTOCOL_KEYS``.
    """
    unknown = sorted(set(protocol_overrides or {}) - set(PROTOCOL_KEYS))
    if unknown:
        raise ValueError(f"method {name!r}: unknown protocols {unknown} in protocol_overrides; valid protocols: {list(PROTOCOL_KEYS)}")

    def decorator(cls: type) -> type:
        if name in _METHODS:
            warnings.warn(f"method {name!r} registered twice; the later registration wins", stacklevel=2)
        cls.method_name = name
        cls.config_class = config_class
        _METHODS[name] = MethodSpec(
            name=name,
            learner_class=cls,
            config_class=config_class,
            train_defaults=train_defaults,
            dataset_train_overrides=dict(dataset_train_overrides or {}),
            dataset_config_overrides=dict(dataset_config_overrides or {}),
            fewshot_epochs=dict(fewshot_epochs or {}),
            protocol_overrides=dict(protocol_overrides or {}),
            citation=citation,
        )
        return cls

    return decorator


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style wildcard, sorted."""
    return sorted(n for n in _METHODS if fnmatch.fnmatch(n, pattern))


def get_method(name: str) -> MethodSpec:
    """Look up a method; unknown names raise ValueError with the close matches."""
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"method name {name!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=2)
        name = new
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(list_methods())}")
    return _METHODS[name]

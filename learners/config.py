"""Typed training configuration, config overrides from ``KEY=VALUE`` strings, and the LR schedule."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

Precision = Literal["fp32", "amp-bf16", "amp-fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "amp-bf16", "amp-fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization hyper-parameters shared by every method (the CoOp harness's semantics).

    The LR schedule is the Dassl one: ``warmup_epochs`` epochs at the constant ``warmup_lr``,
    then epoch e runs at ``0.5 * lr * (1 + cos(pi * (e - warmup_epochs) / epochs))``, stepped once
    per epoch. The last epoch therefore does not reach zero.
    """

    epochs: int = 200
    batch_size: int = 32  # training images per step
    eval_batch_size: int = 100
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.002
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4  # applied to the prompt vectors, as in Dassl
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    reset_optimizer: bool = True  # rebuild the optimizer state at every new experience
    num_workers: int = 0
    grad_clip: float | None = None
    # Frozen image features cached on disk by the base-to-novel, few-shot and transfer runs, for
    # methods whose image tower has no prompt.
    feature_cache: bool = True  # off: every pass encodes its images (--feature-cache off)
    train_feature_views: int | None = None  # augmented views cached per training image; None: one per epoch, 0: none
    feature_cache_max_gb: float = 16.0  # a dataset whose features would exceed this is not cached
    # Memory bounds of the text tower, for every method.
    max_text_chunk: int | None = None  # encode at most this many prompts per text-tower pass
    text_checkpoint: bool = False  # recompute text-block activations in backward instead of storing them

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size!r}/{self.eval_batch_size!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be 'cosine' or 'constant', got {self.scheduler!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.train_feature_views is not None and self.train_feature_views < 0:
            raise ValueError(
                f"train_feature_views must be >= 0 or None (one view per epoch), got {self.train_feature_views!r}; "
                "0 turns the training feature cache off"
            )
        if self.feature_cache_max_gb <= 0:
            raise ValueError(f"feature_cache_max_gb must be > 0, got {self.feature_cache_max_gb!r}")
        if self.max_text_chunk is not None and self.max_text_chunk < 1:
            raise ValueError(f"max_text_chunk must be >= 1 or None (no limit), got {self.max_text_chunk!r}")


def lr_at_epoch(config: TrainConfig, epoch: int) -> float:
    """Learning rate used during 0-based ``epoch`` (Dassl's warmup + cosine, stepped per epoch)."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    if config.scheduler == "constant":
        return config.lr
    progress = (epoch - config.warmup_epochs) / max(config.epochs, 1)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer over the learnable parameters only (fp32 master weights)."""
    if not params:
        raise ValueError("the learner has no trainable parameters; use --epochs 0 to evaluate it")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, weight_decay=config.weight_decay)


# ------------------------------------------------------------------------------------------------
# KEY=VALUE overrides, type-checked against the dataclass field


def _convert(value: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    text = value.strip()
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(text, arg, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        for arg in args:
            if str(arg) == text:
                return arg
        raise ValueError(f"{key} must be one of {list(args)}, got {value!r}")
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects a boolean (true/false), got {value!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key} expects an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} expects a number, got {value!r}") from None
    if annotation is str:
        return text
    if origin in (tuple, list) or annotation in (tuple, list):
        items = [t for t in text.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if t.strip()]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(t, args[0], key) for t in items)
        if origin is tuple and args:
            if len(items) != len(args):
                raise ValueError(f"{key} expects {len(args)} comma-separated values, got {value!r}")
            return tuple(_convert(t, a, key) for t, a in zip(items, args))
        inner = args[0] if args else str
        converted = [_convert(t, inner, key) for t in items]
        return tuple(converted) if origin is tuple else converted
    raise ValueError(f"{key}: cannot parse {value!r} for a field of type {annotation!r}")


def field_types(config_class: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def parse_overrides(
    pairs: list[str], config_classes: Mapping[str, type]
) -> dict[str, dict[str, Any]]:
    """Split ``KEY=VALUE`` strings by the config that owns KEY and convert each value.

    Args:
        pairs: strings such as ``n_ctx=16`` or ``train.lr=0.01``. A ``SECTION.`` prefix picks the
            config explicitly; without it, the key must belong to exactly one config.
        config_classes: section name -> config dataclass, e.g. ``{"method": CoOpConfig,
            "train": TrainConfig}``.

    Returns:
        section -> {field: converted value}.

    Raises:
        ValueError: malformed pair, unknown or ambiguous key, or a value of the wrong type.
    """
    types = {section: field_types(cls) for section, cls in config_classes.items()}
    result: dict[str, dict[str, Any]] = {section: {} for section in config_classes}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        section = None
        if "." in key:
            section, key = key.split(".", 1)
            if section not in types:
                raise ValueError(f"unknown config section {section!r} in {pair!r}; sections: {sorted(types)}")
            owners = [section] if key in types[section] else []
        else:
            owners = [s for s, fields in types.items() if key in fields]
        if not owners:
            valid = sorted({f"{s}.{k}" for s, fields in types.items() for k in fields})
            import difflib

            close = difflib.get_close_matches(key, [v.split(".", 1)[1] for v in valid], n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r} in --set {pair!r}.{hint} Valid keys: {', '.join(valid)}")
        if len(owners) > 1:
            raise ValueError(f"config key {key!r} exists in {owners}; prefix it, e.g. {owners[0]}.{key}={value}")
        owner = owners[0]
        result[owner][key] = _convert(value, types[owner][key], f"{owner}.{key}")
    return result


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly dict of a config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def config_from_dict(config_class: type, values: Mapping[str, Any]) -> Any:
    """Rebuild a config from :func:`config_to_dict` output, restoring tuple fields."""
    types = field_types(config_class)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"unknown {config_class.__name__} field {key!r}")
        origin = typing.get_origin(types[key])
        if isinstance(value, list) and (origin is tuple or tuple in typing.get_args(types[key])):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(value, list):
            unions = [typing.get_origin(a) for a in typing.get_args(types[key])]
            if tuple in unions:
                value = tuple(value)
        kwargs[key] = value
    return config_class(**kwargs)

"""Learner checkpoints: learnable state plus method, config and backbone, loaded strictly."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .base import PromptLearner
from .config import config_to_dict
from .io import save_torch

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def checkpoint_payload(learner: PromptLearner, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of a learner (state on CPU)."""
    backbone = learner.backbone
    classes = learner.classes
    return {
        "schema": SCHEMA_VERSION,
        "method": learner.method_name,
        "config": config_to_dict(learner.config),
        "backbone": {"model": backbone.model_name, "pretrained": backbone.pretrained},
        "classnames": list(classes.classnames) if classes is not None else None,
        "state_dict": {k: v.cpu() for k, v in learner.learnable_state_dict().items()},
        **extra,
    }


def save_checkpoint(path: str | os.PathLike, learner: PromptLearner, **extra: Any) -> Path:
    """Save ``learner``'s learnable state (never CLIP's weights) atomically to ``path``."""
    return save_torch(path, checkpoint_payload(learner, **extra))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a vlprompt checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_VERSION or "state_dict" not in payload:
        raise ValueError(f"{str(path)!r} is not a vlprompt checkpoint (schema {SCHEMA_VERSION})")
    return payload


def load_checkpoint(path: str | os.PathLike | dict, learner: PromptLearner, check_backbone: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``learner`` strictly.

    Raises:
        ValueError: naming what differs: method, backbone, config fields or state keys.
    """
    payload = path if isinstance(path, dict) else read_checkpoint(path)
    problems = []
    if payload["method"] != learner.method_name:
        problems.append(f"method: checkpoint {payload['method']!r} vs learner {learner.method_name!r}")
    if check_backbone:
        model = learner.backbone.model_name
        if payload["backbone"]["model"] != model:
            problems.append(f"backbone: checkpoint {payload['backbone']['model']!r} vs learner {model!r}")
    own = config_to_dict(learner.config)
    differing = sorted(k for k in set(own) | set(payload["config"]) if own.get(k) != payload["config"].get(k))
    if differing:
        problems.append(
            "config fields " + ", ".join(f"{k} (checkpoint {payload['config'].get(k)!r}, learner {own.get(k)!r})" for k in differing)
        )
    if problems:
        raise ValueError("checkpoint does not match the learner: " + "; ".join(problems))
    learner.load_learnable_state_dict(payload["state_dict"], strict=True)
    return payload

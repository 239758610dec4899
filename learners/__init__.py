"""vlprompt learners: the open_clip backbone adapter, the prompt learners and their losses.

This package imports neither Avalanche nor Flower. Importing it registers every method.

Shape letters used throughout: B images in a batch, K classes, M context tokens, L token
positions, D tower width, E joint embedding width, P patch tokens (plus class token), J prompted
depth, N prompt sets.
"""

from .backbone import ClipBackbone, PretrainedWeightsError, TokenReplacement, load_backbone, register_model_configs
from .base import ClassSet, PromptLearner
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, build_optimizer, lr_at_epoch, parse_overrides
from .registry import MethodSpec, ProtocolOverrides, get_method, list_methods, register_method

# Method modules: imported explicitly so the registry is complete.
from . import bip, cocoop, coop, coprompt, ivlp, kgcoop, maple, plot, plotpp, promptsrc, tcp, zeroshot  # noqa: E402,F401  isort: skip

__all__ = [
    "ClassSet",
    "ClipBackbone",
    "MethodSpec",
    "PretrainedWeightsError",
    "PromptLearner",
    "ProtocolOverrides",
    "TokenReplacement",
    "TrainConfig",
    "build_learner",
    "build_optimizer",
    "get_method",
    "list_methods",
    "load_backbone",
    "load_checkpoint",
    "lr_at_epoch",
    "parse_overrides",
    "register_method",
    "register_model_configs",
    "save_checkpoint",
]


def build_learner(name: str, backbone: ClipBackbone, config=None, **overrides) -> PromptLearner:
    """Build a registered method on ``backbone`` with its default config plus ``overrides``."""
    import dataclasses

    spec = get_method(name)
    if config is None:
        config = spec.config_class(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return spec.learner_class(backbone, config)

"""Zero-shot CLIP with hand-crafted prompts (no learnable state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import ClassSet, PromptLearner
from .config import TrainConfig
from .registry import register_method
from .templates import get_ensemble


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot CLIP.

    Attributes:
        ensemble: None for the dataset's hand-crafted template, or a template-ensemble name
            (``imagenet80``, ``select7``) whose text features are averaged per class.
    """

    ensemble: str | None = None

    def __post_init__(self) -> None:
        if self.ensemble is not None:
            get_ensemble(self.ensemble)


@register_method(
    "zeroshot",
    config_class=ZeroShotConfig,
    train_defaults=TrainConfig(epochs=0),
    citation="Learning Transferable Visual Models From Natural Language Supervision, https://arxiv.org/abs/2103.00020",
)
class ZeroShotCLIP(PromptLearner):
    """Zero-shot CLIP: ``logit_scale * cos(image, hand-crafted class prompt)``.

    Learning Transferable Visual Models From Natural Language Supervision
    (https://arxiv.org/abs/2103.00020). Nothing is trained; ``--epochs`` is ignored.

    Limitations: none; works on every open_clip tower.
    """

    uses_frozen_image_features = True

    def __init__(self, backbone, config: ZeroShotConfig) -> None:
        super().__init__(backbone, config)
        self.register_buffer("text_features", torch.empty(0), persistent=False)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        templates = get_ensemble(self.config.ensemble) if self.config.ensemble else None
        self.text_features = self.class_prompt_features(classes, templates)  # (K, E)

    def forward_features(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from frozen image features ``(B, E)``."""
        self.require_classes()
        return self.cosine_logits(features, self.text_features)  # (B, K)

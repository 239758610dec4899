"""KgCoOp: CoOp plus a knowledge-guided distance to hand-crafted class text features."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ClassSet
from .config import TrainConfig
from .coop import CoOp, CoOpConfig
from .losses import knowledge_guided_distance
from .registry import register_method

logger = logging.getLogger(__name__)

# KgCoOp's hand-crafted templates where they differ from the dataset template of the CoOp
# harness, keyed by CoOp dataset config name (htyao89/KgCoOp, KgCoOp/trainers/kgcoop.py).
KGCOOP_TEMPLATES: dict[str, str] = {
    "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.",
}


def kgcoop_template(classes: ClassSet) -> str:
    """Return KgCoOp's hand-crafted template for ``classes``: its own table, else the dataset template."""
    return KGCOOP_TEMPLATES.get(classes.dataset or "", classes.template)


@dataclass(frozen=True)
class KgCoOpConfig(CoOpConfig):
    """KgCoOp prompt design: CoOp's fields plus the knowledge-guided term.

    The reference always initializes the context from "a photo of a" (M = 4, end position,
    shared context), which are the inherited defaults.

    Attributes:
        kg_weight: weight W of ``W * (1 - mean_k cos(w_k, w_clip_k))``; 8.0 in the reference
            base-to-novel scripts.
        handcrafted_template: template of the hand-crafted class prompts; None uses KgCoOp's
            table (DTD and EuroSAT differ from CoOp) and otherwise the dataset's template.
    """

    kg_weight: float = 8.0
    handcrafted_template: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kg_weight < 0:
            raise ValueError(f"kg_weight must be >= 0, got {self.kg_weight!r}")
        if self.handcrafted_template is not None and "{}" not in self.handcrafted_template:
            raise ValueError(
                f"handcrafted_template {self.handcrafted_template!r} has no '{{}}' placeholder for the class name"
            )


class KnowledgeGuidedLoss:
    """Training terms ``ce`` and ``kg`` for learners with class text features and hand-crafted ones.

    The learner provides ``text_features() -> (K, E)``, a ``handcrafted_features`` buffer
    ``(K, E)`` of the current class set and ``config.kg_weight`` (KgCoOp, TCP).
    """

    def loss_terms_features(self, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the logits ``(B, K)`` and the weighted terms ``ce`` and ``kg`` from frozen
        image features ``(B, E)``."""
        self.require_classes()
        text_features = self.text_features()  # (K, E)
        logits = self.cosine_logits(features, text_features)  # (B, K)
        kg = knowledge_guided_distance(text_features, self.handcrafted_features)
        return logits, {"ce": F.cross_entropy(logits, labels), "kg": self.config.kg_weight * kg}


@register_method(
    "kgcoop",
    config_class=KgCoOpConfig,
    train_defaults=TrainConfig(epochs=100, batch_size=128, lr=0.002),
    citation="Visual-Language Prompt Tuning with Knowledge-guided Context Optimization, https://arxiv.org/abs/2303.13283",
)
class KgCoOp(KnowledgeGuidedLoss, CoOp):
    """Visual-Language Prompt Tuning with Knowledge-guided Context Optimization
    (https://arxiv.org/abs/2303.13283).

    CoOp's prompt ``[SOS][ctx_1..ctx_4][class name][.][EOS]`` with a shared context initialized
    from "a photo of a". The training loss adds ``kg_weight * (1 - mean_k cos(w_k, w_clip_k))``
    between the learned class text features w and the frozen features w_clip of the hand-crafted
    prompt of each class in the current (training) class set. Defaults follow
    ``vit_b16_ep100_ctxv1``: batch 128, SGD, LR 0.002, 100 epochs, W = 8.

    Trainable parameters: the context only, M x D = 2,048 on ViT-B/16. The reference also builds
    a meta-net, a bias vector and an adapter that never receive gradients; they are left out.

    Limitations: any open_clip text tower. The hand-crafted features are recomputed for every
    class set, so novel classes need no retraining. Federated rounds can average the context like
    CoOp's; the KG term needs only the client's class names.
    """

    def __init__(self, backbone, config: KgCoOpConfig) -> None:
        super().__init__(backbone, config)
        self.register_buffer("handcrafted_features", torch.empty(0), persistent=False)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        super()._build_class_buffers(classes)
        template = self.config.handcrafted_template or kgcoop_template(classes)
        self.handcrafted_features = self.class_prompt_features(classes, [template])  # (K, E)


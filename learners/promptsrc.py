"""PromptSRC: IVLP prompts regularized toward the frozen model (L1 on features, KL on logits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbone import ClipBackbone
from .base import ClassSet
from .config import TrainConfig
from .base import template_ensemble_features
from .ivlp import IVLP, IVLPConfig
from .losses import l1_consistency, logit_distillation_kl
from .registry import ProtocolOverrides, register_method
from .templates import get_ensemble


@dataclass(frozen=True)
class PromptSRCConfig(IVLPConfig):
    """PromptSRC: the IVLP prompt design plus the self-regulating terms and GPA.

    Attributes:
        text_loss_weight: weight of the L1 between prompted and frozen class text features.
        image_loss_weight: weight of the L1 between prompted and frozen image features.
        logit_loss_weight: weight of KL(zero-shot || prompted) over the logits; the reference has
            no weight on it (1.0).
        templates: template ensemble of the frozen text features (``promptsrc60``: the 60
            templates of the reference; ``imagenet80``; ``select7``).
        gpa_mean: mean (in 1-based epochs) of the Gaussian prompt aggregation weights; None turns
            GPA off. The training loop reads it (``plugins.gpa``); the learner does not.
        gpa_std: standard deviation (in epochs) of the GPA weights.
    """

    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    logit_loss_weight: float = 1.0
    templates: str = "promptsrc60"
    gpa_mean: float | None = 15.0
    gpa_std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("text_loss_weight", "image_loss_weight", "logit_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        get_ensemble(self.templates)
        if self.gpa_std <= 0:
            raise ValueError(f"gpa_std must be > 0 (in epochs), got {self.gpa_std!r}")


@register_method(
    "promptsrc",
    config_class=PromptSRCConfig,
    train_defaults=TrainConfig(epochs=20, batch_size=4, lr=0.0025),
    protocol_overrides={
        "transfer": ProtocolOverrides(
            method={"depth_text": 3, "depth_vision": 3, "gpa_mean": 6.0, "gpa_std": 10.0},
            train={"epochs": 20},
            source="configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml",
        ),
        "fewshot": ProtocolOverrides(
            method={"gpa_mean": 30.0, "gpa_std": 30.0},
            train={"epochs": 50},
            dataset_method={
                name: {"gpa_mean": 45.0, "gpa_std": 5.0}
                for name in ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")
            },
            source="configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml",
        ),
    },
    citation="Self-regulating Prompts: Foundational Model Adaptation without Forgetting, https://arxiv.org/abs/2307.06948",
)
class PromptSRC(IVLP):
    """Self-regulating Prompts: Foundational Model Adaptation without Forgetting
    (https://arxiv.org/abs/2307.06948).

    IVLP prompts (4 text + 4 vision tokens, depth 9/9) trained with
    ``CE + 25 * L1(text) + 10 * L1(image) + KL(zero-shot || prompted)``:

    - L1(text): mean absolute difference between the normalized prompted class text features and
      the frozen features of the 60 PromptSRC templates, averaged unnormalized, then normalized.
    - L1(image): the same between the prompted and the frozen features of the training image.
    - KL: summed over the batch and divided by ``B * K``, as in
      :func:`~learners.losses.logit_distillation_kl`. The zero-shot logits are
      ``logit_scale * cos(frozen image, frozen text)``.

    The frozen features come from the same backbone run without prompts under no_grad, never from
    a second CLIP copy. Gaussian prompt aggregation (``gpa_mean``, ``gpa_std``) is applied by the
    training loop's :class:`plugins.gpa.GaussianPromptAggregationPlugin`, so this class stays
    usable without Avalanche. Defaults are the base-to-novel config (SGD 0.0025, batch 4, 20
    epochs, GPA mean 15, std 1).

    Limitations: as IVLP (ViT image tower, TextTransformer text tower, any class set, fully
    global state). The frozen text targets are encoded once per class set on the first training
    step: K x 60 prompts, 30,000 for ImageNet's 500 base classes.
    """

    def __init__(self, backbone: ClipBackbone, config: PromptSRCConfig) -> None:
        super().__init__(backbone, config)
        self.register_buffer("frozen_text_features", torch.empty(0), persistent=False)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        super()._build_class_buffers(classes)
        self.frozen_text_features = torch.empty(0, device=self.ctx.device)  # rebuilt lazily

    def frozen_text_targets(self) -> Tensor:
        """Normalized frozen text features ``(K, E)`` of the template ensemble, cached per class set."""
        if self.frozen_text_features.numel() == 0:
            classes = self.require_classes()
            # The cache outlives this step, so it is computed in fp32 whatever the caller's autocast.
            with torch.autocast(device_type=self.device.type, enabled=False):
                self.frozen_text_features = template_ensemble_features(
                    self.backbone,
                    classes,
                    get_ensemble(self.config.templates),
                    normalize_each=False,
                    chunk_size=self.config.text_chunk_size,
                )
        return self.frozen_text_features

    def loss_terms(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.config
        image_features, text_features = self.features(images)  # (B, E), (K, E)
        logits = self.cosine_logits(image_features, text_features)  # (B, K)
        terms = {"ce": F.cross_entropy(logits, labels)}
        frozen_text = self.frozen_text_targets()  # (K, E)
        frozen_image = self.frozen_image_features(images)  # (B, E)
        if config.text_loss_weight:
            terms["scl_text"] = config.text_loss_weight * l1_consistency(text_features, frozen_text)
        if config.image_loss_weight:
            terms["scl_image"] = config.image_loss_weight * l1_consistency(image_features, frozen_image)
        if config.logit_loss_weight:
            zero_shot_logits = self.cosine_logits(frozen_image, frozen_text)  # (B, K)
            terms["scl_logits"] = config.logit_loss_weight * logit_distillation_kl(logits, zero_shot_logits)
        return logits, terms

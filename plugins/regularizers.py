"""Method regularizers as Avalanche plugins, so any prompt learner can use them.

Each plugin adds one or more named terms to the training loss in ``before_backward`` through
``PromptStrategy.add_loss_term``. They hold only cached frozen features, keyed by class set, and
use the learner's own frozen backbone: no plugin builds a second CLIP.

The learned features come from the learner: ``features(images) -> ((B, E), (K, E))`` for
methods that prompt both towers (IVLP, MaPLe, PromptSRC, CoPrompt), else ``text_features() ->
(K, E)`` for methods whose image tower stays frozen (CoOp, KgCoOp, TCP). Computing them again in
the plugin costs one more text (and image) forward pass per step.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor

from learners import ClassSet, PromptLearner
from learners.base import template_ensemble_features
from learners.losses import knowledge_guided_distance, l1_consistency, logit_distillation_kl
from learners.templates import get_ensemble

logger = logging.getLogger(__name__)


def learned_features(learner: PromptLearner, images: Tensor, need_images: bool) -> tuple[Tensor | None, Tensor]:
    """Prompted image features ``(B, E)`` (None when the image tower is not prompted) and class
    text features ``(K, E)`` of ``learner``, with gradients.

    Raises:
        NotImplementedError: when the learner exposes neither ``features`` nor ``text_features``
            with ``(K, E)`` output (CoCoOp's per-image text features, PLOT's prompt sets).
    """
    name = learner.method_name or type(learner).__name__
    if hasattr(learner, "features"):
        image_features, text_features = learner.features(images)
        image_features = image_features if need_images else None
    elif hasattr(learner, "text_features"):
        image_features, text_features = None, learner.text_features()
    else:
        raise NotImplementedError(
            f"{name} exposes neither features(images) nor text_features(), so this regularizer "
            "cannot read its learned class text features"
        )
    if text_features.dim() != 2:
        raise NotImplementedError(
            f"{name} returns class text features of shape {tuple(text_features.shape)}; this "
            "regularizer needs one feature per class, (K, E)"
        )
    if image_features is not None and image_features.dim() != 2:
        raise NotImplementedError(
            f"{name} returns image features of shape {tuple(image_features.shape)}; expected (B, E)"
        )
    return image_features, text_features


class _FrozenTextCache:
    """Frozen hand-crafted class text features ``(K, E)``, computed once per class set.

    With several templates the unnormalized features are averaged, then normalized, as PromptSRC
    computes its targets.
    """

    def __init__(self, templates: Sequence[str] | None) -> None:
        self.templates = tuple(templates) if templates else None
        self._features: dict[ClassSet, Tensor] = {}

    def __call__(self, learner: PromptLearner) -> Tensor:
        classes = learner.require_classes()
        if classes not in self._features:
            templates = self.templates or (classes.template,)
            # Cached beyond this step, so computed in fp32 whatever the caller's autocast.
            with torch.autocast(device_type=learner.device.type, enabled=False):
                self._features[classes] = template_ensemble_features(learner.backbone, classes, templates, normalize_each=False)
        return self._features[classes]


class KnowledgeGuidedPlugin(SupervisedPlugin):
    """KgCoOp's knowledge-guided distance for any learner.

    Visual-Language Prompt Tuning with Knowledge-guided Context Optimization
    (https://arxiv.org/abs/2303.13283). Adds ``weight * (1 - mean_k cos(w_k, w_clip_k))`` between
    the learned class text features and the frozen features of the hand-crafted prompts, as the
    term ``plugin_kg``.

    Args:
        weight: weight W of the term (8.0 in KgCoOp).
        template: template of the hand-crafted prompts; None uses each class set's own template.
    """

    def __init__(self, weight: float = 8.0, template: str | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.handcrafted = _FrozenTextCache([template] if template else None)

    def before_backward(self, strategy, *args, **kwargs) -> None:
        learner = strategy.model
        _, text_features = learned_features(learner, strategy.mb_x, need_images=False)
        term = knowledge_guided_distance(text_features, self.handcrafted(learner))
        strategy.add_loss_term("plugin_kg", self.weight * term)


class SelfConsistencyPlugin(SupervisedPlugin):
    """PromptSRC's self-consistency terms against the frozen backbone, for any learner.

    Self-regulating Prompts: Foundational Model Adaptation without Forgetting
    (https://arxiv.org/abs/2307.06948). Adds, as ``plugin_scl_text``, ``plugin_scl_image`` and
    ``plugin_scl_logits``:

    - ``text_weight *`` L1 between normalized learned and frozen class text features, the frozen
      ones averaged over a template ensemble;
    - ``image_weight *`` L1 between normalized prompted and frozen image features (left out for
      learners whose image tower is not prompted, where it is zero);
    - ``logit_weight *`` KL(zero-shot || learned) over the logits, summed and divided by ``B * K``.

    The frozen image features are one extra image forward pass of the same backbone per step.

    Args:
        text_weight / image_weight / logit_weight: PromptSRC's 25, 10 and 1 by default.
        templates: template ensemble name (``promptsrc60``, ``imagenet80``, ``select7``) of the
            frozen text features, or None for each class set's own template.
    """

    def __init__(self, text_weight: float = 25.0, image_weight: float = 10.0, logit_weight: float = 1.0,
                 templates: str | None = "promptsrc60") -> None:
        super().__init__()
        self.text_weight = text_weight
        self.image_weight = image_weight
        self.logit_weight = logit_weight
        self.frozen_text = _FrozenTextCache(get_ensemble(templates) if templates else None)

    def before_backward(self, strategy, *args, **kwargs) -> None:
        learner = strategy.model
        images = strategy.mb_x
        image_features, text_features = learned_features(learner, images, need_images=self.image_weight > 0)
        frozen_text = self.frozen_text(learner)  # (K, E)
        if self.text_weight:
            strategy.add_loss_term("plugin_scl_text", self.text_weight * l1_consistency(text_features, frozen_text))
        if not (self.logit_weight or (self.image_weight and image_features is not None)):
            return
        with torch.no_grad():
            frozen_image = learner.backbone.encode_image(images).float()  # (B, E)
        if self.image_weight and image_features is not None:
            strategy.add_loss_term("plugin_scl_image", self.image_weight * l1_consistency(image_features, frozen_image))
        if self.logit_weight:
            zero_shot = learner.cosine_logits(frozen_image, frozen_text)  # (B, K)
            kl = logit_distillation_kl(strategy.mb_output, zero_shot)
            strategy.add_loss_term("plugin_scl_logits", self.logit_weight * kl)

"""BIP: TCP's class-aware text prompts plus instance-aware visual prompts (VKE).

Shape letters: B images, K classes, M context tokens, D tower width, E joint embedding width,
N training images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import TokenReplacement
from .base import ClassSet, PromptLearner
from .losses import cosine_consistency, knowledge_guided_distance
from .registry import ProtocolOverrides, register_method
from .tcp import TCP_DATASET_TRAIN_OVERRIDES, TCP_TRAIN_DEFAULTS, TCP, TCPConfig, check_blocks, knowledge_embedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BIPConfig(TCPConfig):
    """BIP prompt design: TCP's text fields plus the visual prompts and the extra loss terms.

    The text prompt is ``[SOS][ctx_1..ctx_4]{class}.[EOS]`` for every dataset (the inherited
    ``prompt_template`` defaults to ``"{}."``); the hand-crafted features use TCP's table.

    Attributes:
        visual_n_ctx: number of shallow visual prompt tokens appended before ``ln_pre``.
        vke_hidden_dim: hidden width of each VKE,
            ``Linear(E, 128) -> QuickGELU -> Linear(128, visual_n_ctx * D_vision)``.
        visual_blocks: vision blocks at whose input the VKE tokens are blended into the last
            ``visual_n_ctx`` tokens. Each block has its own VKE, and the reference scripts use
            block 8 only.
        visual_blend_weight: the slots become ``w * instance + (1 - w) * current`` (VFW, 0.75).
        image_kg_weight: weight of ``1 - mean cos(frozen image, fused image)`` (4.0).
        prototype_weight: weight of the two prototype cross-entropies (0.5).
        prototype_scale: logit scale of the prototype classifier (10).
    """

    prompt_template: str | None = "{}."
    visual_n_ctx: int = 4
    vke_hidden_dim: int = 128
    visual_blocks: tuple[int, ...] = (8,)
    visual_blend_weight: float = 0.75
    image_kg_weight: float = 4.0
    prototype_weight: float = 0.5
    prototype_scale: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.visual_n_ctx < 1:
            raise ValueError(f"visual_n_ctx must be >= 1, got {self.visual_n_ctx!r}")
        if self.vke_hidden_dim < 1:
            raise ValueError(f"vke_hidden_dim must be >= 1, got {self.vke_hidden_dim!r}")
        if not self.visual_blocks:
            raise ValueError("visual_blocks must name at least one vision block, e.g. (8,)")
        if not 0.0 <= self.visual_blend_weight <= 1.0:
            raise ValueError(f"visual_blend_weight must be in [0, 1], got {self.visual_blend_weight!r}")
        for name in ("image_kg_weight", "prototype_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.prototype_scale <= 0:
            raise ValueError(f"prototype_scale must be > 0, got {self.prototype_scale!r}")


@register_method(
    "bip",
    config_class=BIPConfig,
    train_defaults=TCP_TRAIN_DEFAULTS,
    dataset_train_overrides=TCP_DATASET_TRAIN_OVERRIDES,
    protocol_overrides={
        "transfer": ProtocolOverrides(
            train={"epochs": 3, "batch_size": 128},
            source="the BIP paper's cross-dataset setting: ImageNet, 16 shots, batch 128, 3 epochs",
        ),
    },
    citation="Bi-modality Individual-aware Prompt tuning for Visual-Language Model, IEEE TPAMI 2025, "
    "https://doi.org/10.1109/TPAMI.2025.3557780",
)
class BIP(TCP):
    """Bi-modality Individual-aware Prompt tuning for Visual-Language Model (IEEE TPAMI 2025,
    https://doi.org/10.1109/TPAMI.2025.3557780; no arXiv version; code: github.com/htyao89/BIP).

    Text: TCP's class-aware prompts on ``[SOS][ctx]{class}.[EOS]`` with random context, TKE
    tokens replacing the context at text block 8. Vision: a shallow visual context (4, D_vision)
    is appended after the patch tokens before ``ln_pre``. A Visual Knowledge Embedding VKE maps
    the frozen (unprompted, no-grad) image feature to instance-aware tokens (B, 4, D_vision),
    which are blended into the last 4 tokens at the input of vision block 8 with weight 0.75.

    Residual fusion: ``image = normalize(normalize(prompted) + normalize(frozen))`` and
    ``text = normalize(normalize(prompted_text) + t)`` with t the hand-crafted features
    (TCP's templates). Logits are ``logit_scale * cos(image, text)``. The loss, as in the
    reference, uses the fused features throughout::

        ce + 8 (1 - cos(text, t)) + 4 (1 - cos(frozen, image))
           + 0.5 [CE(10 cos(image, P)) + CE(10 cos(frozen, P))]

    P (K, E) is a trainable prototype classifier. The reference initializes it from the
    normalized class means of the frozen image features of the training set (one pass with
    the train transforms). A learner does not see the dataset, so P defaults to t until
    :meth:`init_prototypes` is called. ``prototypes_initialized`` is True once P holds image class
    means, or rows loaded from a checkpoint, for the current class set;
    ``plugins.prototypes.PrototypeInitPlugin`` calls :meth:`init_prototypes` before a training
    experience while it is False. P does not enter the logits.

    Trainable parameters on ViT-B/16 (E = 512, D = 512, D_vision = 768): text context 2,048 +
    TKE 329,856 + visual context 4 x 768 = 3,072 + VKE 512 x 128 + 128 + 128 x 3,072 + 3,072 =
    461,952, which is 796,928, plus the prototypes K x 512 (for example 25,600 more for 50
    classes). The reference builds two VKE clones and uses only the first with one visual block,
    which adds 461,952 parameters that never train; here there is one VKE per visual block.

    Defaults follow the reference scripts: Adam (eps 1e-3), LR 0.002, batch 32, 50 epochs;
    SUN397 and ImageNet 25 epochs at batch 128.

    Limitations: needs a ViT image tower and towers deeper than the configured blocks. The
    prototypes belong to the class set being trained: switching classes swaps in the new class
    set's rows (kept per class set, so switching back restores trained rows). Federated rounds
    can average the class-independent state. Averaging P is only meaningful when all clients
    train the same class set.
    """

    # The image tower carries prompts, so the frozen features TCP consumes are not enough.
    uses_frozen_image_features = False
    forward_features = PromptLearner.forward_features
    loss_terms_features = PromptLearner.loss_terms_features

    def __init__(self, backbone, config: BIPConfig) -> None:
        super().__init__(backbone, config)
        if not backbone.is_vit:
            raise NotImplementedError(
                f"BIP appends prompt tokens to the image token sequence, which needs a ViT image tower; "
                f"{backbone.model_name} has a {type(backbone.visual).__name__}"
            )
        check_blocks("visual_blocks", config.visual_blocks, backbone.vision_layers, "vision_layers", backbone)
        width = backbone.vision_width
        visual_ctx = torch.empty(config.visual_n_ctx, width, device=backbone.device).normal_(std=0.02)
        self.visual_ctx = nn.Parameter(visual_ctx)  # (M, D_vision)
        self.vke = nn.ModuleList(
            knowledge_embedding(backbone.embed_dim, config.vke_hidden_dim, config.visual_n_ctx * width)
            for _ in config.visual_blocks
        ).to(backbone.device)
        self.prototypes = nn.Parameter(torch.empty(0, backbone.embed_dim, device=backbone.device))  # (K, E)
        self._prototype_classes: tuple[str, ...] | None = None
        # Class names -> (rows, initialized) of the class sets switched away from.
        self._prototype_stash: dict[tuple[str, ...], tuple[Tensor, bool]] = {}
        self.prototypes_initialized = False

    # ------------------------------------------------------------------------------------------
    # Class set and prototypes

    def _build_class_buffers(self, classes: ClassSet) -> None:
        super()._build_class_buffers(classes)
        if self._prototype_classes == classes.classnames:
            return
        if self._prototype_classes is not None:
            stashed = (self.prototypes.detach().clone(), self.prototypes_initialized)
            self._prototype_stash[self._prototype_classes] = stashed
        rows, initialized = self._prototype_stash.pop(classes.classnames, (self.handcrafted_features.clone(), False))
        self._set_prototypes(rows)
        self._prototype_classes = classes.classnames
        self.prototypes_initialized = initialized

    def _set_prototypes(self, rows: Tensor) -> None:
        rows = rows.to(device=self.prototypes.device, dtype=self.prototypes.dtype)
        if rows.shape == self.prototypes.shape:
            # In place, so an optimizer built over this parameter keeps training it.
            with torch.no_grad():
                self.prototypes.copy_(rows)
        else:
            self.prototypes = nn.Parameter(rows)  # (K, E)

    @torch.no_grad()
    def init_prototypes(self, features: Tensor, labels: Tensor) -> None:
        """Set P to the normalized class means of normalized frozen image features.

        Classes without any image keep their current row (the hand-crafted feature by default).

        Args:
            features: ``(N, E)`` frozen image features of the training images.
            labels: ``(N,)`` labels in ``[0, K)`` of the current class set.

        Raises:
            ValueError: shapes disagree or a label is outside the current class set.
        """
        classes = self.require_classes()
        n_classes = len(classes)
        if features.dim() != 2 or features.shape[1] != self.prototypes.shape[1]:
            raise ValueError(
                f"init_prototypes expects (N, {self.prototypes.shape[1]}) image features, got {tuple(features.shape)}"
            )
        if labels.shape != features.shape[:1]:
            raise ValueError(f"init_prototypes got {features.shape[0]} features but labels of shape {tuple(labels.shape)}")
        labels = labels.to(self.prototypes.device).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise ValueError(
                f"init_prototypes got labels in [{int(labels.min())}, {int(labels.max())}], outside the "
                f"{n_classes} classes of the current class set; call set_classnames first"
            )
        features = F.normalize(features.to(self.prototypes.device).float(), dim=-1)
        sums = torch.zeros(n_classes, features.shape[1], device=features.device).index_add_(0, labels, features)
        counts = torch.bincount(labels, minlength=n_classes)  # (K,)
        seen = counts > 0
        rows = self.prototypes.detach().clone()
        rows[seen] = F.normalize(sums[seen] / counts[seen].unsqueeze(1), dim=-1).to(rows.dtype)
        if not bool(seen.all()):
            logger.warning(
                "init_prototypes: %d of %d classes have no image and keep their current prototype",
                int((~seen).sum()),
                n_classes,
            )
        self._set_prototypes(rows)
        self.prototypes_initialized = True

    def load_learnable_state_dict(self, state: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load learnable state strictly, except prototypes saved for a class set of another size.

        Such prototypes are skipped and P keeps the current class set's rows: they do not affect
        the logits, and the reference's loader always drops them. Prototypes with the current
        row count are loaded and taken to belong to the current class set (the resume case).
        """
        # NOTE: rows saved for another class set of the same size also load, because the state
        # dict does not record class names. They only affect training, never the logits.
        state = dict(state)
        saved = state.get("prototypes")
        if saved is not None and saved.dim() == 2 and saved.shape[1] == self.prototypes.shape[1]:
            if saved.shape[0] != self.prototypes.shape[0]:
                logger.info(
                    "skipping %d saved prototypes: the current class set has %d classes",
                    saved.shape[0],
                    self.prototypes.shape[0],
                )
                state["prototypes"] = self.prototypes.detach().clone()
        super().load_learnable_state_dict(state, strict)
        if saved is not None and saved.shape == self.prototypes.shape:
            self.prototypes_initialized = True

    # ------------------------------------------------------------------------------------------
    # Forward and loss

    def instance_prompts(self, frozen_features: Tensor) -> dict[int, TokenReplacement]:
        """Map ``(B, E)`` normalized frozen image features through each VKE to its block's tokens."""
        n_images, n_tokens = frozen_features.shape[0], self.config.visual_n_ctx
        return {
            block: TokenReplacement(
                vke(frozen_features).view(n_images, n_tokens, -1),  # (B, M, D_vision)
                start=-n_tokens,
                weight=self.config.visual_blend_weight,
            )
            for block, vke in zip(self.config.visual_blocks, self.vke)
        }

    def fused_features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the normalized frozen image ``(B, E)``, fused image ``(B, E)`` and fused text ``(K, E)`` features."""
        self.require_classes()
        with torch.no_grad():
            frozen = F.normalize(self.backbone.encode_image(images), dim=-1)  # (B, E)
        prompted = self.backbone.encode_image(images, prompts=self.visual_ctx, deep=self.instance_prompts(frozen))
        image = F.normalize(F.normalize(prompted, dim=-1) + frozen, dim=-1)  # (B, E)
        text = F.normalize(F.normalize(self.text_features(), dim=-1) + self.handcrafted_features, dim=-1)  # (K, E)
        return frozen, image, text

    def forward(self, images: Tensor) -> Tensor:
        _, image, text = self.fused_features(images)
        return self.cosine_logits(image, text)  # (B, K)

    def loss_terms(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the logits ``(B, K)`` and the weighted terms ``ce``, ``kg``, ``image_kg`` and ``prototype``."""
        frozen, image, text = self.fused_features(images)
        logits = self.cosine_logits(image, text)  # (B, K)
        assert self.prototypes.shape[0] == logits.shape[1], "prototypes out of sync with the class set"
        prototypes = F.normalize(self.prototypes, dim=-1)  # (K, E)
        scale = self.config.prototype_scale
        prototype_ce = F.cross_entropy(scale * image @ prototypes.t(), labels) + F.cross_entropy(
            scale * frozen.to(prototypes.dtype) @ prototypes.t(), labels
        )
        config = self.config
        return logits, {
            "ce": F.cross_entropy(logits, labels),
            "kg": config.kg_weight * knowledge_guided_distance(text, self.handcrafted_features),
            "image_kg": config.image_kg_weight * cosine_consistency(image, frozen),
            "prototype": config.prototype_weight * prototype_ce,
        }

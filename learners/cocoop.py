"""CoCoOp: CoOp's context shifted per image by a meta-net on the frozen image feature."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ClassSet, PromptLearner
from .config import TrainConfig
from .coop import init_context
from .prompts import build_prompt_pieces
from .registry import register_method


@dataclass(frozen=True)
class CoCoOpConfig:
    """CoCoOp prompt design.

    Attributes:
        n_ctx: number of context tokens M; ignored when ``ctx_init`` is set (M = its token count).
        ctx_init: init phrase, or None for random N(0, 0.02^2) init.
        meta_net_reduction: the meta-net's hidden width is ``E // meta_net_reduction``
            (512 / 16 = 32 on ViT-B/16).
        text_chunk_size: encode at most this many (image, class) prompts at once. Every image
            has its own K prompts, so one batch encodes B x K sequences; this bounds the memory
            of one text-encoder pass.
    """

    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"
    meta_net_reduction: int = 16
    text_chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx!r}")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init must be a non-empty phrase or None")
        if self.meta_net_reduction < 1:
            raise ValueError(f"meta_net_reduction must be >= 1, got {self.meta_net_reduction!r}")
        if self.text_chunk_size < 1:
            raise ValueError(
                f"text_chunk_size must be >= 1, got {self.text_chunk_size!r}; it bounds how many "
                "prompts one text-encoder pass holds"
            )


@register_method(
    "cocoop",
    config_class=CoCoOpConfig,
    train_defaults=TrainConfig(epochs=10, batch_size=1, lr=0.002),
    citation="Conditional Prompt Learning for Vision-Language Models, https://arxiv.org/abs/2203.05557",
)
class CoCoOp(PromptLearner):
    """Conditional Prompt Learning for Vision-Language Models (https://arxiv.org/abs/2203.05557).

    A meta-net ``Linear(E, E/16) -> ReLU -> Linear(E/16, D)`` maps the L2-normalized frozen
    image feature to a bias pi(x) that is added to every context token:
    ``ctx_i(x) = ctx_i + pi(x)``. Each image therefore has its own K class prompts, and a batch
    encodes B x K prompts (in chunks of ``text_chunk_size``). Defaults follow
    ``vit_b16_c4_ep10_batch1_ctxv1``: M = 4 from "a photo of a", batch 1, SGD, LR 0.002,
    10 epochs.

    Trainable parameters on ViT-B/16: context 4 x 512 = 2,048 plus meta-net
    512 x 32 + 32 + 32 x 512 + 512 = 33,312, in all 35,360.

    Limitations: any open_clip text tower. Training and evaluation cost B x K text passes per
    batch (about 27 times CoOp's time per image in the reference), so large class sets are slow.
    The class-independent state (context and meta-net) transfers to novel classes and can be
    averaged in federated rounds.
    """

    uses_frozen_image_features = True

    def __init__(self, backbone, config: CoCoOpConfig) -> None:
        super().__init__(backbone, config)
        ctx, n_ctx = init_context(backbone, config.n_ctx, config.ctx_init)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)  # (M, D)
        hidden = max(backbone.embed_dim // config.meta_net_reduction, 1)
        self.meta_net = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(backbone.embed_dim, hidden)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(hidden, backbone.text_width)),
                ]
            )
        ).to(backbone.device)
        self._placeholder = config.ctx_init.replace("_", " ") if config.ctx_init else " ".join(["X"] * n_ctx)
        for name in ("token_prefix", "token_suffix", "eot_index"):
            self.register_buffer(name, torch.empty(0), persistent=False)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        prompts = [f"{self._placeholder} {name}." for name in classes.classnames]
        pieces = build_prompt_pieces(self.backbone, prompts, self.n_ctx)
        self.token_prefix, self.token_suffix, self.eot_index = pieces.prefix, pieces.suffix, pieces.eot_index

    def conditioned_context(self, image_features: Tensor) -> Tensor:
        """Shift the context by the meta-net output of each image: ``(B, E)`` features to ``(B, M, D)``."""
        shift = self.meta_net(F.normalize(image_features.float(), dim=-1))  # (B, D)
        return self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, M, D)

    def conditional_text_features(self, context: Tensor) -> Tensor:
        """Encode every class prompt under every image's context.

        Args:
            context: ``(B, M, D)`` per-image context from :meth:`conditioned_context`.

        Returns:
            ``(B, K, E)`` unnormalized text features.
        """
        n_images = context.shape[0]
        n_classes = self.token_prefix.shape[0]
        context = context.to(self.token_prefix.dtype)
        total = n_images * n_classes
        parts = []
        # Prompts are assembled chunk by chunk, so neither the (B*K, L, D) embeddings nor the
        # activations of all B*K sequences exist at once outside autograd's saved tensors.
        for begin in range(0, total, self.config.text_chunk_size):
            pairs = torch.arange(begin, min(begin + self.config.text_chunk_size, total), device=context.device)
            image_index, class_index = pairs // n_classes, pairs % n_classes
            embeddings = torch.cat(
                [self.token_prefix[class_index], context[image_index], self.token_suffix[class_index]], dim=1
            )  # (N, L, D)
            parts.append(self.backbone.encode_text_tokens(embeddings, self.eot_index[class_index]))  # (N, E)
        return torch.cat(parts, dim=0).view(n_images, n_classes, -1)  # (B, K, E)

    def forward_features(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from frozen image features ``(B, E)`` (also the meta-net input)."""
        self.require_classes()
        text_features = self.conditional_text_features(self.conditioned_context(features))  # (B, K, E)
        image_features = F.normalize(features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        logits = torch.einsum("be,bke->bk", image_features.to(text_features.dtype), text_features)  # (B, K)
        return self.backbone.logit_scale * logits

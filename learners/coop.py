"""CoOp: learnable context vectors in front of (or around) the class name."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import ClassSet, PromptLearner
from .config import TrainConfig
from .prompts import ClassTokenPosition, PromptPieces, assemble_prompts, build_prompt_pieces, phrase_embedding
from .registry import register_method


@dataclass(frozen=True)
class CoOpConfig:
    """CoOp prompt design.

    Attributes:
        n_ctx: number of context tokens M; with ``ctx_init`` it must equal the phrase's token count.
        ctx_init: init phrase such as ``"a photo of a"``, or None for random N(0, 0.02^2) init.
        class_specific: one context per class (CSC) instead of one shared context.
        class_token_position: ``end``, ``middle`` or ``front``.
        text_chunk_size: encode at most this many class prompts at once (memory bound).
    """

    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"
    class_specific: bool = False
    class_token_position: ClassTokenPosition = "end"
    text_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx!r}")
        if self.class_token_position not in ("end", "middle", "front"):
            raise ValueError(
                f"class_token_position must be 'end', 'middle' or 'front', got {self.class_token_position!r}"
            )
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init must be a non-empty phrase or None")


def init_context(backbone, n_ctx: int, ctx_init: str | None, n_rows: int | None = None) -> tuple[Tensor, int]:
    """Initial context ``(M, D)`` (or ``(n_rows, M, D)``) from a phrase or N(0, 0.02^2)."""
    width = backbone.text_width
    if ctx_init:
        ctx, phrase_tokens = phrase_embedding(backbone, ctx_init.replace("_", " "))
        if phrase_tokens != n_ctx:
            raise ValueError(
                f"n_ctx={n_ctx} does not match ctx_init={ctx_init!r}, which has {phrase_tokens} tokens: pass "
                f"ctx_init=none to learn {n_ctx} randomly initialized context tokens, or n_ctx={phrase_tokens}"
            )
        ctx = ctx.float()
        if n_rows is not None:
            ctx = ctx.unsqueeze(0).repeat(n_rows, 1, 1)  # (K, M, D)
    else:
        shape = (n_ctx, width) if n_rows is None else (n_rows, n_ctx, width)
        ctx = torch.empty(shape, device=backbone.device).normal_(std=0.02)
    return ctx, n_ctx


@register_method(
    "coop",
    config_class=CoOpConfig,
    train_defaults=TrainConfig(epochs=200, batch_size=32, lr=0.002),
    dataset_train_overrides={"imagenet": {"epochs": 50}},
    fewshot_epochs={1: 50, 2: 100, 4: 100, 8: 200, 16: 200},
    citation="Learning to Prompt for Vision-Language Models, https://arxiv.org/abs/2109.01134",
)
class CoOp(PromptLearner):
    """CoOp: Learning to Prompt for Vision-Language Models (https://arxiv.org/abs/2109.01134).

    The text input is ``[SOS][ctx_1..ctx_M][class name][.][EOS]`` with only the context learnable;
    logits are ``logit_scale * cos``. Defaults follow the base-to-novel configuration run in the
    CoCoOp paper (M = 4 from "a photo of a", 200 epochs, ImageNet 50).

    Limitations: any open_clip text tower; class-specific context is tied to the class count, so
    a CSC checkpoint cannot score a different class set.
    """

    uses_frozen_image_features = True

    def __init__(self, backbone, config: CoOpConfig) -> None:
        super().__init__(backbone, config)
        self._n_rows: int | None = None
        ctx, n_ctx = init_context(backbone, config.n_ctx, config.ctx_init)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)  # (M, D), or (K, M, D) once classes are known for CSC
        self._placeholder = " ".join(["X"] * n_ctx) if not config.ctx_init else config.ctx_init.replace("_", " ")
        for name in ("token_prefix", "token_suffix", "eot_index", "name_lengths"):
            self.register_buffer(name, torch.empty(0), persistent=False)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        if self.config.class_specific:
            if self._n_rows is None:
                ctx, _ = init_context(self.backbone, self.config.n_ctx, self.config.ctx_init, len(classes))
                self.ctx = nn.Parameter(ctx.to(self.ctx.device))  # (K, M, D)
                self._n_rows = len(classes)
            elif self._n_rows != len(classes):
                raise ValueError(
                    f"class-specific context was learned for {self._n_rows} classes and cannot score "
                    f"{len(classes)}; use shared context (class_specific=false) for base-to-novel"
                )
        prompts = [f"{self._placeholder} {name}." for name in classes.classnames]
        pieces = build_prompt_pieces(self.backbone, prompts, self.n_ctx, classnames=classes.classnames)
        self.token_prefix, self.token_suffix = pieces.prefix, pieces.suffix
        self.eot_index, self.name_lengths = pieces.eot_index, pieces.name_lengths

    def load_learnable_state_dict(self, state, strict: bool = True) -> None:
        if self.config.class_specific and "ctx" in state and state["ctx"].dim() == 3 and self._n_rows is None:
            self.ctx = nn.Parameter(torch.zeros_like(state["ctx"], device=self.ctx.device))
            self._n_rows = state["ctx"].shape[0]
        super().load_learnable_state_dict(state, strict)

    def text_features(self) -> Tensor:
        """Learned class text features ``(K, E)``, computed once per step (and once per
        evaluation pass, see :meth:`reuse_text_features`)."""
        return self.memoized_text_features("text", self._encode_class_prompts)

    def _encode_class_prompts(self) -> Tensor:
        pieces = PromptPieces(self.token_prefix, self.token_suffix, self.eot_index, self.name_lengths)
        embeddings = assemble_prompts(pieces, self.ctx, self.config.class_token_position)  # (K, L, D)
        return self.backbone.encode_text_tokens(embeddings, self.eot_index, chunk_size=self.config.text_chunk_size)

    def forward_features(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from frozen image features ``(B, E)``."""
        self.require_classes()
        return self.cosine_logits(features, self.text_features())  # (B, K)

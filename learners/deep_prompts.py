"""Deep prompts in both towers: the machinery IVLP, MaPLe, PromptSRC and CoPrompt share.

A deep-prompt learner puts M learnable text tokens right after the start-of-text token and
(optionally) M learnable vision tokens after the patch tokens, before ``ln_pre``. At the input of
each block 1..J-1 of a tower, those slots are overwritten by that block's own prompt tokens, so a
prompt depth J means prompts in blocks 0..J-1. The frozen backbone does the insertion
(:class:`~learners.backbone.TokenReplacement`); this module builds the tokens and the dicts.

Shape letters: B images, K classes, M prompt tokens, L token positions, D tower width, E joint
embedding width, J prompt depth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from .backbone import ClipBackbone, TokenReplacement
from .base import ClassSet, PromptLearner
from .prompts import PromptPieces, assemble_prompts, build_prompt_pieces, phrase_embedding

logger = logging.getLogger(__name__)

PROMPT_INIT_STD = 0.02
"""Standard deviation of the N(0, std^2) init of every randomly initialized prompt token."""

"""Default number of plain-text prompts tokenized and encoded per call when building frozen targets."""


def check_prompt_depth(depth: int, num_layers: int, field_name: str, tower: str, minimum: int = 1) -> None:
    """Validate a prompt depth against the number of blocks of a tower.

    Args:
        depth: prompted depth J (prompts in blocks 0..J-1).
        num_layers: number of transformer blocks of the tower.
        field_name: name of the config field of ``depth``, quoted in the error.
        tower: ``"text"`` or ``"vision"``, named in the error.
        minimum: smallest allowed depth (0 lets a tower go without prompts).

    Raises:
        ValueError: depth below ``minimum`` or above ``num_layers``.
    """
    if depth < minimum:
        raise ValueError(f"{field_name} must be >= {minimum}, got {depth!r}")
    if depth > num_layers:
        raise ValueError(
            f"{field_name}={depth} exceeds the {num_layers} blocks of the backbone's {tower} tower; "
            f"set {field_name} to at most {num_layers}"
        )


def random_prompts(count: int, n_tokens: int, width: int, device: torch.device) -> nn.ParameterList:
    """``count`` prompt tensors ``(M, D)``, each initialized N(0, 0.02^2)."""
    return nn.ParameterList(
        [nn.Parameter(torch.empty(n_tokens, width, device=device).normal_(std=PROMPT_INIT_STD)) for _ in range(count)]
    )


def text_replacements(deep_prompts: Sequence[Tensor], start: int = 1) -> dict[int, TokenReplacement]:
    """Map the prompts of blocks 1..J-1 to replacements of the text slots after start-of-text."""
    return {block: TokenReplacement(tokens, start) for block, tokens in enumerate(deep_prompts, start=1)}


def vision_replacements(deep_prompts: Sequence[Tensor]) -> dict[int, TokenReplacement]:
    """Map the prompts of blocks 1..J-1 to replacements of the last M vision tokens."""
    return {block: TokenReplacement(tokens, -tokens.shape[-2]) for block, tokens in enumerate(deep_prompts, start=1)}


@torch.no_grad()
def init_text_context(backbone: ClipBackbone, n_ctx: int, ctx_init: str | None) -> tuple[Tensor, str]:
    """Initial text context ``(M, D)`` and the phrase written before each class name.

    As in MaPLe and PromptSRC, the context copies the first ``n_ctx`` token embeddings of
    ``ctx_init``, and the rest of the phrase stays in the prompt as fixed text: with n_ctx 2 and
    "a photo of a" the prompt is ``[SOS][ctx][ctx] of a {class}.``. When there is no init phrase
    or it has fewer than ``n_ctx`` tokens, the context is drawn from N(0, 0.02^2) and the
    prompt reads ``[SOS][ctx] x M {class}.``.

    Returns:
        ``(M, D)`` fp32 context on the backbone's device, and the phrase placed before the name.
    """
    if ctx_init:
        phrase = ctx_init.replace("_", " ")
        embedding, length = phrase_embedding(backbone, phrase)  # (L_phrase, D)
        if n_ctx <= length:
            return embedding[:n_ctx].float().clone(), phrase  # (M, D)
        logger.info(
            "init phrase %r has %d tokens, fewer than n_ctx=%d: the context starts from N(0, 0.02^2) instead",
            phrase,
            length,
            n_ctx,
        )
    ctx = torch.empty(n_ctx, backbone.text_width, device=backbone.device).normal_(std=PROMPT_INIT_STD)
    return ctx, " ".join(["X"] * n_ctx)


@dataclass
class PromptTokens:
    """The prompt tokens of one forward pass of a deep-prompt learner.

    Attributes:
        text_ctx: ``(M, D_text)`` context after start-of-text at the input of block 0.
        text_deep: J_text - 1 tensors ``(M, D_text)`` replacing that context at blocks 1..J-1.
        vision_ctx: ``(M_v, D_vision)`` tokens appended before ``ln_pre``, or None.
        vision_deep: J_vision - 1 tensors ``(M_v, D_vision)`` replacing them at blocks 1..J-1.
    """

    text_ctx: Tensor
    text_deep: list[Tensor] = field(default_factory=list)
    vision_ctx: Tensor | None = None
    vision_deep: list[Tensor] = field(default_factory=list)


class DeepPromptLearner(PromptLearner):
    """Base of the learners with deep prompts in both towers.

    Subclasses create their parameters in ``__init__`` (after calling this one with the text
    context size and init phrase) and implement :meth:`prompt_tokens`. This class owns the text
    context ``ctx``, the class-name buffers, both encoders and the cosine logits.

    Args:
        backbone: the frozen backbone.
        config: the method's config; ``text_chunk_size`` is read when present.
        n_ctx: number of text context tokens M.
        ctx_init: init phrase of the text context, or None for N(0, 0.02^2).
    """

    def __init__(self, backbone: ClipBackbone, config, n_ctx: int, ctx_init: str | None) -> None:
        super().__init__(backbone, config)
        ctx, self._prompt_phrase = init_text_context(backbone, n_ctx, ctx_init)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx)  # (M, D_text)
        for name in ("token_prefix", "token_suffix", "eot_index"):
            self.register_buffer(name, torch.empty(0), persistent=False)

    def prompt_tokens(self) -> PromptTokens:
        """The prompt tokens of both towers for one forward pass."""
        raise NotImplementedError

    def _build_class_buffers(self, classes: ClassSet) -> None:
        prompts = [f"{self._prompt_phrase} {name}." for name in classes.classnames]
        pieces = build_prompt_pieces(self.backbone, prompts, self.n_ctx)
        self.token_prefix = pieces.prefix.to(self.ctx.device)  # (K, 1, D)
        self.token_suffix = pieces.suffix.to(self.ctx.device)  # (K, L-1-M, D)
        self.eot_index = pieces.eot_index.to(self.ctx.device)  # (K,)

    # ------------------------------------------------------------------------------------------
    # Encoders

    def encode_text(self, tokens: PromptTokens) -> Tensor:
        """Prompted class text features ``(K, E)``, not normalized."""
        pieces = PromptPieces(self.token_prefix, self.token_suffix, self.eot_index, torch.zeros_like(self.eot_index))
        embeddings = assemble_prompts(pieces, tokens.text_ctx)  # (K, L, D)
        return self.backbone.encode_text_tokens(
            embeddings,
            self.eot_index,
            deep=text_replacements(tokens.text_deep),
            chunk_size=getattr(self.config, "text_chunk_size", None),
        )

    def encode_images(self, images: Tensor, tokens: PromptTokens) -> Tensor:
        """Prompted image features ``(B, E)``, not normalized."""
        return self.backbone.encode_image(images, prompts=tokens.vision_ctx, deep=vision_replacements(tokens.vision_deep))

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Prompted image features ``(B, E)`` and class text features ``(K, E)``, not normalized."""
        self.require_classes()
        tokens = self.prompt_tokens()
        # Class prompts do not depend on the images: an evaluation pass encodes them once.
        text_features = self.memoized_text_features("deep_text", lambda: self.encode_text(tokens))
        return self.encode_images(images, tokens), text_features

    def forward(self, images: Tensor) -> Tensor:
        image_features, text_features = self.features(images)
        return self.cosine_logits(image_features, text_features)  # (B, K)

    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """Image features ``(B, E)`` of the same backbone without prompts (the frozen teacher)."""
        return self.backbone.encode_image(images)

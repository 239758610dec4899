"""MaPLe: coupled text and vision deep prompts (vision prompts projected from the text ones)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from .backbone import ClipBackbone
from .config import TrainConfig
from .deep_prompts import DeepPromptLearner, PromptTokens, check_prompt_depth, random_prompts
from .registry import ProtocolOverrides, register_method


@dataclass(frozen=True)
class MaPLeConfig:
    """Multi-modal (coupled) prompt design.

    Attributes:
        n_ctx: context tokens M in each tower.
        ctx_init: init phrase; its first ``n_ctx`` tokens are learnable and the rest stays as
            fixed text (n_ctx 2: ``[SOS][ctx][ctx] of a {class}.``). None, or a phrase with
            fewer tokens, draws the context from N(0, 0.02^2).
        depth: prompt depth J of both towers: prompts at the input of blocks 0..J-1.
        text_chunk_size: encode at most this many class prompts at once (memory bound).
    """

    n_ctx: int = 2
    ctx_init: str | None = "a photo of a"
    depth: int = 9
    text_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx!r}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1 (the context sits in block 0), got {self.depth!r}")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init must be a non-empty phrase or None")


@register_method(
    "maple",
    config_class=MaPLeConfig,
    train_defaults=TrainConfig(epochs=5, batch_size=4, lr=0.0035),
    protocol_overrides={
        "transfer": ProtocolOverrides(
            method={"depth": 3},
            train={"epochs": 2, "lr": 0.0026},
            source="configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml",
        ),
    },
    citation="MaPLe: Multi-modal Prompt Learning, https://arxiv.org/abs/2210.03117",
)
class MaPLe(DeepPromptLearner):
    """MaPLe: Multi-modal Prompt Learning (https://arxiv.org/abs/2210.03117).

    Text: ``n_ctx`` context tokens after start-of-text (the first tokens of "a photo of a") and
    one ``(M, D_text)`` N(0, 0.02^2) prompt per text block 1..J-1. Vision: no free tokens; the
    prompt of vision block j is ``Linear_j(text prompt of block j)`` with one
    ``Linear(D_text, D_vision)`` per prompted block (block 0 projects the context), appended
    before ``ln_pre`` and replacing the last M tokens at blocks 1..J-1. Logits are
    ``logit_scale * cos``; the loss is cross-entropy. Defaults are the base-to-novel config
    (n_ctx 2, depth 9, SGD 0.0035, batch 4, 5 epochs).

    As in the reference, the projections of blocks 1..J-1 start as copies of one randomly
    initialized layer, while block 0's projection has its own init. Nothing is cast to half
    precision: parameters stay fp32 and the forward follows the caller's autocast.

    Limitations: needs an open_clip ViT image tower and a TextTransformer text tower; ``depth``
    is checked against both towers' block counts. No class-specific state, so it scores any class
    set and its whole state is global in federated rounds.
    """

    def __init__(self, backbone: ClipBackbone, config: MaPLeConfig) -> None:
        check_prompt_depth(config.depth, backbone.text_layers, "depth", "text")
        check_prompt_depth(config.depth, backbone.vision_layers, "depth", "vision")
        super().__init__(backbone, config, config.n_ctx, config.ctx_init)
        device = self.ctx.device
        text_width, vision_width = backbone.text_width, backbone.vision_width
        self.deep_text = random_prompts(config.depth - 1, config.n_ctx, text_width, device)
        deep_projection = nn.Linear(text_width, vision_width, device=device)
        self.vision_projections = nn.ModuleList(
            [nn.Linear(text_width, vision_width, device=device)]
            + [copy.deepcopy(deep_projection) for _ in range(config.depth - 1)]
        )

    def prompt_tokens(self) -> PromptTokens:
        text = [self.ctx, *self.deep_text]
        vision = [projection(tokens) for projection, tokens in zip(self.vision_projections, text)]  # J x (M, D_v)
        return PromptTokens(text_ctx=text[0], text_deep=text[1:], vision_ctx=vision[0], vision_deep=vision[1:])

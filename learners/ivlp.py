"""IVLP: independent deep text and vision prompts (the baseline of MaPLe and PromptSRC)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .backbone import ClipBackbone
from .config import TrainConfig
from .deep_prompts import DeepPromptLearner, PromptTokens, check_prompt_depth, random_prompts
from .registry import register_method


@dataclass(frozen=True)
class IVLPConfig:
    """Independent vision-language prompt design.

    Attributes:
        n_ctx_text: text context tokens after start-of-text.
        ctx_init: init phrase of the text context; its first ``n_ctx_text`` tokens are copied
            (the rest stays as fixed text). None, or a phrase with fewer tokens, draws the
            context from N(0, 0.02^2).
        n_ctx_vision: vision prompt tokens appended before ``ln_pre``, N(0, 0.02^2).
        depth_text: text prompt depth J: prompts at the input of blocks 0..J-1 (at least 1).
        depth_vision: vision prompt depth J; 0 leaves the image tower without prompts.
        text_chunk_size: encode at most this many class prompts at once (memory bound).
    """

    n_ctx_text: int = 4
    ctx_init: str | None = "a photo of a"
    n_ctx_vision: int = 4
    depth_text: int = 9
    depth_vision: int = 9
    text_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_ctx_text < 1:
            raise ValueError(f"n_ctx_text must be >= 1, got {self.n_ctx_text!r}")
        if self.n_ctx_vision < 1:
            raise ValueError(f"n_ctx_vision must be >= 1, got {self.n_ctx_vision!r}")
        if self.depth_text < 1:
            raise ValueError(f"depth_text must be >= 1 (the text context sits in block 0), got {self.depth_text!r}")
        if self.depth_vision < 0:
            raise ValueError(f"depth_vision must be >= 0, got {self.depth_vision!r}")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init must be a non-empty phrase or None")


@register_method(
    "ivlp",
    config_class=IVLPConfig,
    train_defaults=TrainConfig(epochs=20, batch_size=4, lr=0.0025),
    citation="MaPLe: Multi-modal Prompt Learning (IVLP baseline), https://arxiv.org/abs/2210.03117",
)
class IVLP(DeepPromptLearner):
    """Independent V-L prompting, the baseline of MaPLe: Multi-modal Prompt Learning
    (https://arxiv.org/abs/2210.03117), also the architecture of PromptSRC.

    Text: ``n_ctx_text`` context tokens after start-of-text, from "a photo of a", and one
    ``(M, D_text)`` N(0, 0.02^2) prompt per text block 1..J-1 that replaces them at that block's
    input. Vision: ``n_ctx_vision`` N(0, 0.02^2) tokens appended after the patch tokens before
    ``ln_pre``, replaced at the input of vision blocks 1..J-1 by their own prompts. The towers do
    not share parameters. Logits are ``logit_scale * cos``; the loss is cross-entropy.

    Defaults are the IVLP config of the PromptSRC repository (4+4 tokens, depth 9/9, SGD 0.0025,
    batch 4, 20 epochs: 84.21 / 71.79 / 77.51 base / novel / HM on ViT-B/16). The MaPLe paper's
    IVLP baseline (82.15 / 74.07 / 77.90) used 2+2 tokens, depth 12/12, LR 0.0035 and 5 epochs:
    ``--set n_ctx_text=2 n_ctx_vision=2 depth_text=12 depth_vision=12 lr=0.0035 --epochs 5``.

    Limitations: needs an open_clip ViT image tower and a TextTransformer text tower; depths are
    checked against each tower's block count. No class-specific state, so it scores any class set
    (base-to-novel, class-incremental) and its whole state is global in federated rounds.
    """

    def __init__(self, backbone: ClipBackbone, config: IVLPConfig) -> None:
        check_prompt_depth(config.depth_text, backbone.text_layers, "depth_text", "text")
        check_prompt_depth(config.depth_vision, backbone.vision_layers, "depth_vision", "vision", minimum=0)
        super().__init__(backbone, config, config.n_ctx_text, config.ctx_init)
        device = self.ctx.device
        self.deep_text = random_prompts(config.depth_text - 1, config.n_ctx_text, backbone.text_width, device)
        self.vision_ctx: nn.Parameter | None = None
        if config.depth_vision > 0:
            self.vision_ctx = random_prompts(1, config.n_ctx_vision, backbone.vision_width, device)[0]  # (M_v, D_v)
        self.deep_vision = random_prompts(
            max(config.depth_vision - 1, 0), config.n_ctx_vision, backbone.vision_width, device
        )

    def prompt_tokens(self) -> PromptTokens:
        return PromptTokens(
            text_ctx=self.ctx,
            text_deep=list(self.deep_text),
            vision_ctx=self.vision_ctx,
            vision_deep=list(self.deep_vision),
        )

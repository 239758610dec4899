"""PLOT: N sets of CoOp context matched to an image's local features by optimal transport."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import Tensor, nn

from .backbone import ClipBackbone
from .base import ClassSet
from .config import TrainConfig
from .ot import TransportPlan, validate_sinkhorn_settings
from .prompt_sets import PromptSetLearner, build_prompt_set_pieces
from .prompts import ClassTokenPosition
from .registry import register_method

logger = logging.getLogger(__name__)


@torch.no_grad()
def resnet_attention_pool_tokens(visual: ModifiedResNet, images: Tensor) -> Tensor:
    """Run a ModifiedResNet with every position of its attention pool used as a query.

    open_clip's ``AttentionPool2d`` prepends the mean of the P-1 = h*w grid features to the grid
    and returns only the output of that first position. This function calls the tower's own stem,
    residual stages and pool weights, and returns the outputs of all P positions. Each query
    attends to the same keys and values, so output 0 is the tower's usual image feature and
    outputs 1..P-1 are local features, each after ``c_proj``.

    Args:
        visual: an open_clip ``ModifiedResNet`` (the RN50/RN101 image towers).
        images: ``(B, 3, H, W)`` normalized pixels.

    Returns:
        ``(B, P, E)``: position 0 the global feature, then the grid row by row.
    """
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = stage(x)  # (B, C, h, w)
    pool = visual.attnpool
    x = x.flatten(2).permute(2, 0, 1)  # (P-1, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (P, B, C)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)  # (P, B, C)
    x, _ = F.multi_head_attention_forward(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return x.transpose(0, 1)  # (B, P, E)


@torch.no_grad()
def encode_local_features(backbone: ClipBackbone, images: Tensor) -> tuple[Tensor, Tensor]:
    """Global and local image features of a frozen image tower.

    Args:
        backbone: a ViT or ModifiedResNet backbone.
        images: ``(B, 3, H, W)`` normalized pixels.

    Returns:
        ``(B, E)`` global features and ``(B, P-1, E)`` local features. On a ModifiedResNet the
        local features are the attention-pool outputs of the P-1 grid positions (49 on RN50 at
        224 px). On a ViT they are the patch tokens after ``ln_post`` and the projection (196 on
        ViT-B/16).

    Raises:
        NotImplementedError: other image towers (timm), which expose no local features here.
    """
    if backbone.is_vit:
        return backbone.encode_image(images, return_tokens=True)
    if isinstance(backbone.visual, ModifiedResNet):
        tokens = resnet_attention_pool_tokens(backbone.visual, images)  # (B, P, E)
        return tokens[:, 0], tokens[:, 1:]
    raise NotImplementedError(
        f"PLOT needs local image features, which only ViT and ModifiedResNet (RN50...) towers provide; "
        f"{type(backbone.visual).__name__} is not supported"
    )


@dataclass(frozen=True)
class PLOTConfig:
    """PLOT prompt design and transport settings.

    Attributes:
        n_prompts: number of prompt sets N, each a separate learnable context.
        n_ctx: context tokens M per set, each initialized from N(0, 0.02^2).
        class_token_position: ``end``, ``middle`` or ``front``.
        ot_epsilon: entropic regularization; the Sinkhorn kernel is ``exp(-(1 - cos) / epsilon)``.
        ot_max_iter: maximum number of Sinkhorn iterations.
        ot_tolerance: Sinkhorn stops when the mean change of its row scaling falls below this;
            0 runs all ``ot_max_iter`` iterations.
        ot_plan: ``sinkhorn``, or ``uniform`` for the mean-pooling ablation (every local feature
            and prompt pair weighted ``1 / (M_local * N)``).
        add_global_logits: add the cosine logits of the global image feature against the mean of
            the N text features (the reference turns this on for ImageNet only).
        text_chunk_size: encode at most this many of the N*K prompts at once (memory bound).
    """

    n_prompts: int = 4
    n_ctx: int = 16
    class_token_position: ClassTokenPosition = "end"
    ot_epsilon: float = 0.1
    ot_max_iter: int = 100
    ot_tolerance: float = 1e-2
    ot_plan: TransportPlan = "sinkhorn"
    add_global_logits: bool = False
    text_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {self.n_prompts!r}")
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx!r}")
        if self.class_token_position not in ("end", "middle", "front"):
            raise ValueError(
                f"class_token_position must be 'end', 'middle' or 'front', got {self.class_token_position!r}"
            )
        validate_sinkhorn_settings(self.ot_epsilon, self.ot_max_iter, self.ot_tolerance, self.ot_plan)


@register_method(
    "plot",
    config_class=PLOTConfig,
    train_defaults=TrainConfig(epochs=50, batch_size=128, lr=0.002),
    dataset_config_overrides={"imagenet": {"add_global_logits": True}},
    citation="PLOT: Prompt Learning with Optimal Transport for Vision-Language Models, https://arxiv.org/abs/2210.01253",
)
class PLOT(PromptSetLearner):
    """PLOT: Prompt Learning with Optimal Transport for Vision-Language Models
    (https://arxiv.org/abs/2210.01253).

    N prompt sets, each a CoOp context ``[SOS][ctx_1..ctx_M][class name][.][EOS]``, give N text
    features per class, and the frozen image tower gives a set of local features per image. The
    logit of class k is ``logit_scale * sum(T * cos)`` over the (local feature, prompt) pairs,
    with ``T`` the entropic OT plan between the two sets under the cost ``1 - cos`` (see
    :func:`learners.ot.transport_scores`). Only the contexts are trained, with cross-entropy.
    Defaults follow the reference RN50 config: N = 4, M = 16, batch 128, SGD at 0.002 for 50
    epochs at every shot count, and global logits added on ImageNet only.

    Trainable parameters: ``N * M * D_text``, 4 * 16 * 512 = 32,768 for RN50 and ViT-B/16 (their
    text width is 512) and 4,096 for ``toy-clip``.

    Limitations: the image tower must be a ModifiedResNet (the published setting, 49 local
    features on RN50) or a ViT; timm towers raise NotImplementedError. The reference code runs
    RN50 only, so PLOT on a ViT (transport over its patch tokens) has no published number. Any
    open_clip text tower works. The contexts are shared by all classes, so a checkpoint scores
    any class set (base-to-novel, class-incremental), and the whole state is global in federated
    rounds. The text tower encodes N*K prompts per step, N times CoOp's cost; on ImageNet that
    is 4,000 prompts, and ``text_chunk_size`` bounds their activation memory.
    """

    uses_frozen_image_features = True
    frozen_feature_kind = "pooled+local"

    def __init__(self, backbone: ClipBackbone, config: PLOTConfig) -> None:
        super().__init__(backbone, config)
        ctx = torch.empty(config.n_prompts, config.n_ctx, backbone.text_width, device=backbone.device)
        self.ctx = nn.Parameter(ctx.normal_(std=0.02))  # (N, M, D)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        placeholder = " ".join(["X"] * self.config.n_ctx)
        prompts = [f"{placeholder} {name}." for name in classes.classnames]
        self.set_prompt_pieces(build_prompt_set_pieces(self.backbone, [prompts], self.config.n_ctx, classes.classnames))

    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """Global and local features of ``(B, 3, H, W)`` images in one tensor ``(B, P, E)``:
        position 0 the global feature, then the P-1 local features."""
        global_features, local_features = encode_local_features(self.backbone, images)  # (B, E), (B, P-1, E)
        return torch.cat([global_features.unsqueeze(1), local_features], dim=1)  # (B, P, E)

    def forward_features(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from the ``(B, P, E)`` output of :meth:`frozen_image_features`."""
        self.require_classes()
        global_features, local_features = features[:, 0], features[:, 1:]  # (B, E), (B, P-1, E)
        text_features = self.text_features()  # (N, K, E)
        logits = self.transport_logits(local_features, text_features)  # (B, K)
        if self.config.add_global_logits:
            logits = logits + self.cosine_logits(global_features, text_features.mean(dim=0))
        return logits

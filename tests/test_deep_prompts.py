"""Deep-prompt learners (IVLP, MaPLe, PromptSRC, CoPrompt): parameters, insertion, state, class switch."""

from __future__ import annotations

import pytest
import torch

from learners import build_learner, load_backbone
from learners.checkpoint import load_checkpoint, save_checkpoint
from learners.coprompt import CoPromptConfig
from learners.deep_prompts import init_text_context
from learners.ivlp import IVLPConfig
from learners.maple import MaPLeConfig
from tests.tcp_family_support import (
    BASE,
    NOVEL_3,
    assert_backbone_unchanged,
    backbone_snapshot,
    base_batch,
    toy_backbone,
    train_steps,
)

DEEP_METHODS = ("ivlp", "maple", "promptsrc", "coprompt")

EXPECTED_TRAINABLE_PREFIXES = {
    "ivlp": {"ctx", "deep_text", "vision_ctx", "deep_vision"},
    "promptsrc": {"ctx", "deep_text", "vision_ctx", "deep_vision"},
    "maple": {"ctx", "deep_text", "vision_projections"},
    "coprompt": {"ctx", "deep_text", "vision_projections", "image_adapter", "text_adapter"},
}


def make(method: str, **overrides):
    torch.manual_seed(0)
    learner = build_learner(method, toy_backbone(), **overrides)
    learner.set_classnames(BASE)
    return learner


# ---------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("method", DEEP_METHODS)
def test_only_prompt_state_trains(method):
    learner = make(method)
    backbone = learner.backbone
    snapshot = backbone_snapshot(backbone)
    names = {name for name, p in learner.named_parameters() if p.requires_grad}
    assert {name.split(".")[0] for name in names} == EXPECTED_TRAINABLE_PREFIXES[method]
    assert set(learner.state_dict()) == {name for name, _ in learner.named_parameters()}
    images, labels = base_batch(4)
    train_steps(learner, images, labels, steps=1)
    for name, parameter in learner.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got a zero gradient"
    assert_backbone_unchanged(backbone, snapshot)


def test_toy_parameter_counts():
    backbone = toy_backbone()
    text, vision, embed = backbone.text_width, backbone.vision_width, backbone.embed_dim
    ivlp = 9 * 4 * text + 9 * 4 * vision
    maple = 9 * 2 * text + 9 * (text * vision + vision)
    adapters = 2 * 2 * embed * (embed // 4)
    assert make("ivlp").num_trainable_parameters() == ivlp
    assert make("promptsrc").num_trainable_parameters() == ivlp
    assert make("maple").num_trainable_parameters() == maple
    assert make("coprompt").num_trainable_parameters() == maple + adapters


@pytest.mark.slow
def test_vit_b16_parameter_counts():
    backbone = load_backbone("ViT-B-16", "none")
    assert build_learner("ivlp", backbone).num_trainable_parameters() == 46_080
    assert build_learner("promptsrc", backbone).num_trainable_parameters() == 46_080
    assert build_learner("maple", backbone).num_trainable_parameters() == 3_555_072
    coprompt = build_learner("coprompt", backbone, config=CoPromptConfig(n_ctx=2, depth=9))
    assert coprompt.num_trainable_parameters() == 3_817_216


def test_maple_context_is_first_tokens_of_phrase():
    backbone = toy_backbone()
    ctx, phrase = init_text_context(backbone, 2, "a photo of a")
    ids = backbone.tokenize(["a photo of a"])
    assert torch.equal(ctx, backbone.token_embedding(ids)[0, 1:3].float())
    assert phrase == "a photo of a"
    learner = make("maple")
    ids = backbone.tokenize([f"a photo of a {BASE.classnames[0]}."])
    # The suffix keeps "of a {class}." as fixed text after the two learnable slots.
    assert torch.equal(learner.token_suffix[0], backbone.token_embedding(ids)[0, 3:])


def test_short_init_phrase_falls_back_to_random():
    backbone = toy_backbone()
    ctx, phrase = init_text_context(backbone, 6, "a photo of a")
    assert phrase == "X X X X X X"
    assert ctx.shape == (6, backbone.text_width)
    assert 0.005 < float(ctx.std()) < 0.05


@pytest.mark.parametrize(
    ("config", "field", "tower"),
    [
        (IVLPConfig(depth_text=13), "depth_text", "text"),
        (IVLPConfig(depth_vision=13), "depth_vision", "vision"),
        (MaPLeConfig(depth=13), "depth", "text"),
    ],
)
def test_depth_beyond_tower_raises(config, field, tower):
    spec_name = "ivlp" if isinstance(config, IVLPConfig) else "maple"
    with pytest.raises(ValueError, match=rf"{field}=13 exceeds the 12 blocks of the backbone's {tower} tower"):
        build_learner(spec_name, toy_backbone(), config=config)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="depth_text must be >= 1"):
        IVLPConfig(depth_text=0)
    with pytest.raises(ValueError, match="n_ctx must be >= 1"):
        MaPLeConfig(n_ctx=0)
    with pytest.raises(ValueError, match="image_adapter_ratio must be in"):
        CoPromptConfig(image_adapter_ratio=1.5)


# ---------------------------------------------------------------------------------------------
# Insertion at the configured blocks, read with forward hooks on the resblocks


def record_blocks(learner, images):
    """Run the learner once; return the input and output of every text and vision block.

    Returns:
        ``(text inputs, text outputs), (vision inputs, vision outputs)``, each a dict block -> tensor.
    """
    towers = {
        "text": learner.backbone.model.transformer.resblocks,
        "vision": learner.backbone.visual.transformer.resblocks,
    }
    records, handles = {}, []
    for tower, blocks in towers.items():
        inputs, outputs = {}, {}
        records[tower] = (inputs, outputs)
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, args, d=inputs, i=index: d.__setitem__(i, args[0].detach())))
            handles.append(block.register_forward_hook(lambda m, args, out, d=outputs, i=index: d.__setitem__(i, out.detach())))
    try:
        with torch.no_grad():
            learner(images)
    finally:
        for handle in handles:
            handle.remove()
    return records["text"], records["vision"]


def check_tower(inputs, outputs, slots: slice, prompts: dict[int, torch.Tensor], num_blocks: int) -> None:
    """Prompted blocks see exactly ``prompts[i]`` in ``slots``; everything else flows through unchanged."""
    assert sorted(inputs) == list(range(num_blocks))
    for i in range(1, num_blocks):
        previous, current = outputs[i - 1], inputs[i]
        kept = torch.ones(current.shape[1], dtype=torch.bool)
        kept[slots] = False
        assert torch.equal(current[:, kept], previous[:, kept]), f"block {i}: tokens outside the prompt slots changed"
        if i in prompts:
            expected = prompts[i].expand_as(current[:, slots])
            assert torch.allclose(current[:, slots], expected), f"block {i}: prompt slots hold other tokens"
        else:
            assert torch.equal(current[:, slots], previous[:, slots]), f"block {i}: unprompted block was replaced"


@pytest.mark.parametrize(("depth_text", "depth_vision"), [(9, 9), (3, 5), (1, 0)])
def test_ivlp_replaces_prompts_at_configured_blocks(depth_text, depth_vision):
    learner = make("ivlp", depth_text=depth_text, depth_vision=depth_vision)
    backbone = learner.backbone
    (text_in, text_out), (vision_in, vision_out) = record_blocks(learner, base_batch(2)[0])
    m = learner.n_ctx
    position = backbone.model.positional_embedding[1 : 1 + m]
    assert torch.allclose(text_in[0][:, 1 : 1 + m], (learner.ctx + position).expand(len(BASE), -1, -1))
    text_prompts = {i: p.detach() for i, p in enumerate(learner.deep_text, start=1)}
    assert sorted(text_prompts) == list(range(1, depth_text))
    check_tower(text_in, text_out, slice(1, 1 + m), text_prompts, backbone.text_layers)

    patches = 1 + (backbone.image_size // 8) ** 2
    if depth_vision == 0:
        assert vision_in[0].shape[1] == patches
        return
    mv = learner.config.n_ctx_vision
    assert vision_in[0].shape[1] == patches + mv
    assert torch.allclose(vision_in[0][:, -mv:], backbone.visual.ln_pre(learner.vision_ctx).expand(2, -1, -1), atol=1e-6)
    vision_prompts = {i: p.detach() for i, p in enumerate(learner.deep_vision, start=1)}
    assert sorted(vision_prompts) == list(range(1, depth_vision))
    check_tower(vision_in, vision_out, slice(patches, patches + mv), vision_prompts, backbone.vision_layers)


def test_maple_vision_prompts_are_projected_text_prompts():
    learner = make("maple", depth=4)
    backbone = learner.backbone
    (text_in, text_out), (vision_in, vision_out) = record_blocks(learner, base_batch(2)[0])
    m = learner.n_ctx
    with torch.no_grad():
        projected = [proj(t) for proj, t in zip(learner.vision_projections, [learner.ctx, *learner.deep_text])]
    patches = vision_in[0].shape[1] - m
    assert torch.allclose(vision_in[0][:, -m:], backbone.visual.ln_pre(projected[0]).expand(2, -1, -1), atol=1e-6)
    check_tower(vision_in, vision_out, slice(patches, patches + m), dict(enumerate(projected[1:], 1)), backbone.vision_layers)
    text_prompts = {i: p.detach() for i, p in enumerate(learner.deep_text, start=1)}
    check_tower(text_in, text_out, slice(1, 1 + m), text_prompts, backbone.text_layers)


def test_maple_deep_projections_start_identical():
    learner = make("maple")
    first, *rest = learner.vision_projections[1:]
    for projection in rest:
        assert torch.equal(first.weight, projection.weight)
        assert torch.equal(first.bias, projection.bias)
    assert not torch.equal(learner.vision_projections[0].weight, first.weight)


@pytest.mark.parametrize("method", ("maple", "coprompt"))
def test_autocast_keeps_fp32_parameters(method):
    learner = make(method)
    images, labels = base_batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, terms = learner.loss_terms(images, labels)
    assert logits.dtype == torch.bfloat16
    sum(t.float() for t in terms.values()).backward()
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    assert torch.isfinite(learner.ctx.grad).all()
    assert learner.ctx.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Learnable state


@pytest.mark.parametrize("method", DEEP_METHODS)
def test_checkpoint_round_trip(method, tmp_path):
    learner = make(method)
    images, labels = base_batch(4)
    train_steps(learner, images, labels, steps=2)
    learner.eval()
    with torch.no_grad():
        expected = learner(images)
    path = save_checkpoint(tmp_path / "model.pt", learner)

    torch.manual_seed(123)
    restored = build_learner(method, toy_backbone())
    restored.set_classnames(BASE)
    restored.eval()
    with torch.no_grad():
        assert not torch.allclose(restored(images), expected)
    load_checkpoint(path, restored)
    with torch.no_grad():
        assert torch.equal(restored(images), expected)


def test_checkpoint_of_other_method_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "maple.pt", make("maple"))
    with pytest.raises(ValueError, match="method: checkpoint 'maple' vs learner 'coprompt'"):
        load_checkpoint(path, make("coprompt"))


@pytest.mark.parametrize("method", DEEP_METHODS)
def test_base_to_novel_switch(method):
    learner = make(method)
    images, labels = base_batch(4)
    train_steps(learner, images, labels, steps=1)
    state = learner.learnable_state_dict()
    learner.eval()
    with torch.no_grad():
        base_logits = learner(images)
        learner.set_classnames(NOVEL_3)
        novel_logits = learner(images)
    assert base_logits.shape == (4, len(BASE))
    assert novel_logits.shape == (4, len(NOVEL_3))
    assert learner.token_prefix.shape[0] == len(NOVEL_3)
    for key, value in learner.learnable_state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed on the class switch"
    learner.train()
    _, terms = learner.loss_terms(images, torch.tensor([0, 1, 2, 0]))
    assert all(torch.isfinite(t) for t in terms.values())

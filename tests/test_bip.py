"""BIP: VKE blending at the visual block, residual fusion, loss terms, prototypes and the plugin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from learners import build_learner, load_checkpoint, save_checkpoint
from learners.bip import BIPConfig
from learners.losses import cosine_consistency, knowledge_guided_distance
from plugins.prototypes import PrototypeInitPlugin, prototype_plugins
from strategies.experiment import RunSettings, get_backbone

from .tcp_family_support import (
    BASE,
    NOVEL_3,
    assert_backbone_unchanged,
    backbone_snapshot,
    base_batch,
    check_round_trip_and_novel_switch,
    run_base2novel_cli,
    shared_digits_root,
    toy_backbone,
    train_steps,
    trainable_names,
)

TOY_TKE = (64 * 128 + 128) + (128 * 4 * 64 + 4 * 64)
TOY_VKE = (64 * 128 + 128) + (128 * 4 * 64 + 4 * 64)
TOY_PARAMS = 4 * 64 + TOY_TKE + 4 * 64 + TOY_VKE  # plus 64 per class for the prototypes


@pytest.fixture()
def learner():
    torch.manual_seed(4)
    model = build_learner("bip", toy_backbone())
    model.set_classnames(BASE)
    return model


def visual_block_inputs(learner, images, **encode_kwargs) -> list[torch.Tensor]:
    """Inputs of every vision block for one ``encode_image`` call."""
    blocks = learner.backbone.model.visual.transformer.resblocks
    inputs: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(index):
        def record(_module, args):
            inputs[index] = args[0].detach().clone()

        return record

    handles = [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            learner.backbone.encode_image(images, **encode_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def test_bip_output_shapes(learner):
    images, _ = base_batch(3)
    frozen, image, text = learner.fused_features(images)
    assert learner.visual_ctx.shape == (4, 64)
    assert learner.prototypes.shape == (5, 64)
    assert (frozen.shape, image.shape, text.shape) == ((3, 64), (3, 64), (5, 64))
    assert learner(images).shape == (3, 5)


def test_bip_trains_only_prompt_parameters(learner):
    assert trainable_names(learner) == {
        "ctx",
        "visual_ctx",
        "prototypes",
        *(f"{mlp}.{layer}.{kind}" for mlp in ("tke", "vke.0") for layer in ("linear1", "linear2") for kind in ("weight", "bias")),
    }
    assert learner.num_trainable_parameters() == TOY_PARAMS + 5 * 64
    snapshot = backbone_snapshot(learner.backbone)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    terms = train_steps(learner, *base_batch(4))
    assert set(terms) == {"ce", "kg", "image_kg", "prototype"}
    for name in ("ctx", "visual_ctx", "prototypes", "tke.linear2.weight", "vke.0.linear2.weight"):
        assert not torch.equal(dict(learner.named_parameters())[name], before[name]), name
    assert_backbone_unchanged(learner.backbone, snapshot)


def test_bip_vke_blends_at_block_8(learner):
    images, _ = base_batch(2)
    with torch.no_grad():
        frozen = F.normalize(learner.backbone.encode_image(images), dim=-1)
        instance = learner.vke[0](frozen).view(2, 4, 64)
    deep = learner.instance_prompts(frozen)
    assert list(deep) == [8]
    prompted = visual_block_inputs(learner, images, prompts=learner.visual_ctx, deep=deep)
    shallow = visual_block_inputs(learner, images, prompts=learner.visual_ctx)
    for i in range(8):
        torch.testing.assert_close(prompted[i], shallow[i], rtol=0, atol=0)
    n_tokens = prompted[8].shape[1]
    assert n_tokens == 16 + 1 + 4  # patches, class token, visual context
    torch.testing.assert_close(prompted[8][:, -4:], 0.75 * instance + 0.25 * shallow[8][:, -4:])
    torch.testing.assert_close(prompted[8][:, :-4], shallow[8][:, :-4], rtol=0, atol=0)


def test_bip_shallow_visual_context_enters_before_ln_pre(learner):
    images, _ = base_batch(1)
    inputs = visual_block_inputs(learner, images, prompts=learner.visual_ctx)
    visual = learner.backbone.model.visual
    expected = visual.ln_pre(torch.cat([torch.zeros(1, 17, 64), learner.visual_ctx.detach().unsqueeze(0)], dim=1))
    # ln_pre acts per token, so the prompt tokens after it do not depend on the patches.
    torch.testing.assert_close(inputs[0][:, -4:], expected[:, -4:])


def test_bip_residual_fusion_and_logits(learner):
    images, _ = base_batch(2)
    backbone = learner.backbone
    with torch.no_grad():
        frozen, image, text = learner.fused_features(images)
        raw = backbone.encode_image(images)
        prompted = backbone.encode_image(
            images, prompts=learner.visual_ctx, deep=learner.instance_prompts(F.normalize(raw, dim=-1))
        )
        expected_image = F.normalize(F.normalize(prompted, dim=-1) + F.normalize(raw, dim=-1), dim=-1)
        expected_text = F.normalize(F.normalize(learner.text_features(), dim=-1) + learner.handcrafted_features, dim=-1)
        torch.testing.assert_close(frozen, F.normalize(raw, dim=-1))
        torch.testing.assert_close(image, expected_image)
        torch.testing.assert_close(text, expected_text)
        torch.testing.assert_close(learner(images), backbone.logit_scale * expected_image @ expected_text.t())


def test_bip_loss_terms_match_their_formulas(learner):
    images, labels = base_batch(4)
    logits, terms = learner.loss_terms(images, labels)
    frozen, image, text = learner.fused_features(images)
    prototypes = F.normalize(learner.prototypes, dim=-1)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(terms["kg"], 8.0 * knowledge_guided_distance(text, learner.handcrafted_features))
    torch.testing.assert_close(terms["image_kg"], 4.0 * cosine_consistency(image, frozen))
    expected = 0.5 * (
        F.cross_entropy(10.0 * image @ prototypes.t(), labels) + F.cross_entropy(10.0 * frozen @ prototypes.t(), labels)
    )
    torch.testing.assert_close(terms["prototype"], expected)


def test_prototypes_default_to_handcrafted_features(learner):
    torch.testing.assert_close(learner.prototypes, learner.handcrafted_features, rtol=0, atol=0)


def test_init_prototypes_sets_class_means(learner):
    features = torch.randn(7, 64)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 4])  # class 2 has no image
    default_row = learner.prototypes[2].detach().clone()
    parameter = learner.prototypes
    learner.init_prototypes(features, labels)
    assert learner.prototypes is parameter
    normalized = F.normalize(features, dim=-1)
    for label in (0, 1, 3, 4):
        expected = F.normalize(normalized[labels == label].mean(dim=0), dim=0)
        torch.testing.assert_close(learner.prototypes[label], expected)
    torch.testing.assert_close(learner.prototypes[2], default_row, rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside"):
        learner.init_prototypes(features, torch.tensor([0, 1, 2, 3, 4, 5, 0]))
    with pytest.raises(ValueError, match="image features"):
        learner.init_prototypes(torch.randn(7, 32), labels)


def test_prototype_plugin_uses_frozen_features(learner):
    images, labels = base_batch(6)
    dataset = torch.utils.data.TensorDataset(images, labels)
    strategy = SimpleNamespace(
        model=learner,
        experience=SimpleNamespace(dataset=dataset),
        eval_mb_size=4,
        device=torch.device("cpu"),
        train_config=SimpleNamespace(num_workers=0),
    )
    assert not learner.prototypes_initialized
    PrototypeInitPlugin().before_training_exp(strategy)
    assert learner.prototypes_initialized
    expected = torch.zeros(5, 64)
    with torch.no_grad():
        features = F.normalize(learner.backbone.encode_image(images), dim=-1)
    for label in labels.unique():
        expected[label] = F.normalize(features[labels == label].mean(dim=0), dim=0)
        torch.testing.assert_close(learner.prototypes[label], expected[label])
    assert [type(p) for p in prototype_plugins(learner)] == [PrototypeInitPlugin]
    assert prototype_plugins(build_learner("tcp", learner.backbone)) == []


def test_prototype_plugin_skips_initialized_class_set(learner):
    images, labels = base_batch(6)
    learner.init_prototypes(torch.randn(5, 64), torch.arange(5))
    initialized = learner.prototypes.detach().clone()
    strategy = SimpleNamespace(
        model=learner,
        experience=SimpleNamespace(dataset=torch.utils.data.TensorDataset(images, labels)),
        eval_mb_size=4,
        device=torch.device("cpu"),
        train_config=SimpleNamespace(num_workers=0),
    )
    PrototypeInitPlugin().before_training_exp(strategy)
    assert torch.equal(learner.prototypes, initialized)


def test_prototypes_initialized_follows_class_set(learner, tmp_path):
    assert not learner.prototypes_initialized
    learner.init_prototypes(torch.randn(5, 64), torch.arange(5))
    assert learner.prototypes_initialized
    path = save_checkpoint(tmp_path / "bip.pt", learner)

    learner.set_classnames(NOVEL_3)
    assert not learner.prototypes_initialized
    learner.set_classnames(BASE)
    assert learner.prototypes_initialized

    same_size = build_learner("bip", learner.backbone)
    same_size.set_classnames(BASE)
    load_checkpoint(path, same_size)
    assert same_size.prototypes_initialized
    other_size = build_learner("bip", learner.backbone)
    other_size.set_classnames(NOVEL_3)
    load_checkpoint(path, other_size)
    assert not other_size.prototypes_initialized


def test_bip_checkpoint_round_trip_and_novel_switch(learner, tmp_path):
    fresh = check_round_trip_and_novel_switch(learner, tmp_path)
    trained = torch.load(tmp_path / "bip.pt")["state_dict"]["prototypes"]
    assert trained.shape == (5, 64)

    # Each class set gets its own rows: the novel classes start from their hand-crafted
    # features, and the fresh learner skipped the 5 saved rows.
    assert learner.prototypes.shape == (3, 64)
    torch.testing.assert_close(learner.prototypes, learner.handcrafted_features, rtol=0, atol=0)
    torch.testing.assert_close(fresh.prototypes, fresh.handcrafted_features, rtol=0, atol=0)

    # Switching back restores the trained rows of the base classes.
    learner.set_classnames(BASE)
    assert torch.equal(learner.prototypes, trained)


def test_bip_load_restores_same_size_prototypes(learner, tmp_path):
    train_steps(learner, *base_batch(4))
    path = save_checkpoint(tmp_path / "bip.pt", learner)
    restored = build_learner("bip", learner.backbone)
    restored.set_classnames(BASE)
    load_checkpoint(path, restored)
    assert torch.equal(restored.prototypes, learner.prototypes)


def test_bip_strict_load_still_rejects_wrong_shapes(learner):
    state = learner.learnable_state_dict()
    state["visual_ctx"] = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="visual_ctx"):
        learner.load_learnable_state_dict(state)
    state = learner.learnable_state_dict()
    state["prototypes"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match="prototypes"):
        learner.load_learnable_state_dict(state)


def test_bip_config_fields_and_validation():
    config = BIPConfig()
    assert (config.visual_blend_weight, config.image_kg_weight, config.prototype_weight) == (0.75, 4.0, 0.5)
    assert (config.prompt_template, config.ctx_init, config.visual_blocks) == ("{}.", None, (8,))
    with pytest.raises(ValueError, match="visual_blend_weight"):
        BIPConfig(visual_blend_weight=1.5)
    with pytest.raises(ValueError, match="vision_layers=12"):
        build_learner("bip", toy_backbone(), BIPConfig(visual_blocks=(12,)))


@pytest.mark.slow
def test_bip_base2novel_cli(tmp_path, tmp_path_factory):
    results = run_base2novel_cli("bip", shared_digits_root(tmp_path_factory), tmp_path, "--set", "batch_size=4")
    assert results["trainable_params"] == TOY_PARAMS + 5 * 64
    assert set(results["loss_terms"]) >= {"ce", "kg", "image_kg", "prototype", "loss"}
    checkpoint = torch.load(tmp_path / "runs" / "base2novel" / "digits" / "bip" / "seed1" / "model.pt")
    # The run's own backbone (cached per process), so the hand-crafted features are the run's.
    backbone = get_backbone(RunSettings(model="toy-clip", pretrained="none", device="cpu"))
    learner = build_learner("bip", backbone)
    learner.set_classnames(BASE)
    # The plugin replaced the hand-crafted default with image class means before training,
    # and one warmup epoch at LR 1e-5 moves them by far less than 0.1.
    assert (checkpoint["state_dict"]["prototypes"] - learner.handcrafted_features).abs().max() > 0.1

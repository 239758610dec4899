"""TCP: TKE tokens replace the context slots at the configured text block; counts on ViT-B/16."""

from __future__ import annotations

import open_clip
import pytest
import torch

from learners import ClassSet, build_learner, load_backbone
from learners.backbone import ClipBackbone
from learners.losses import knowledge_guided_distance
from learners.tcp import TCPConfig, tcp_handcrafted_template, tcp_prompt_template

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
TOY_PARAMS = 4 * 64 + TOY_TKE


@pytest.fixture()
def learner():
    torch.manual_seed(3)
    model = build_learner("tcp", toy_backbone())
    model.set_classnames(BASE)
    return model


def capture_block_inputs(blocks) -> tuple[list, list]:
    """Record the input of every block in ``blocks`` (one list of inputs per block)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = [
        block.register_forward_pre_hook(lambda _m, args, i=i: inputs[i].append(args[0].detach().clone()))
        for i, block in enumerate(blocks)
    ]
    return inputs, handles


def text_block_inputs(learner, encode) -> list[torch.Tensor]:
    """Inputs of every text block during ``encode()``."""
    blocks = learner.backbone.model.transformer.resblocks
    inputs, handles = capture_block_inputs(blocks)
    try:
        with torch.no_grad():
            encode()
    finally:
        for handle in handles:
            handle.remove()
    return [captured[0] for captured in inputs]


def learner_block_inputs(learner) -> list[torch.Tensor]:
    """Inputs of every text block while the learner encodes its class prompts."""
    return text_block_inputs(learner, learner.text_features)


def plain_block_inputs(learner) -> list[torch.Tensor]:
    """Inputs of every text block for the same prompts without any replacement."""
    ctx = learner.ctx.unsqueeze(0).expand(learner.token_prefix.shape[0], -1, -1)
    embeddings = torch.cat([learner.token_prefix, ctx, learner.token_suffix], dim=1)
    return text_block_inputs(learner, lambda: learner.backbone.encode_text_tokens(embeddings, learner.eot_index))


def test_tcp_output_shapes(learner):
    images, _ = base_batch(3)
    assert learner.ctx.shape == (4, 64)
    assert learner.handcrafted_features.shape == (5, 64)
    assert learner.class_aware_tokens().shape == (5, 4, 64)
    assert learner.text_features().shape == (5, 64)
    assert learner(images).shape == (3, 5)


def test_tcp_trains_only_context_and_tke(learner):
    assert trainable_names(learner) == {
        "ctx",
        "tke.linear1.weight",
        "tke.linear1.bias",
        "tke.linear2.weight",
        "tke.linear2.bias",
    }
    assert learner.num_trainable_parameters() == TOY_PARAMS
    snapshot = backbone_snapshot(learner.backbone)
    tke_before = learner.tke.linear2.weight.detach().clone()
    terms = train_steps(learner, *base_batch(2))
    assert set(terms) == {"ce", "kg"}
    assert not torch.equal(learner.tke.linear2.weight, tke_before)
    assert_backbone_unchanged(learner.backbone, snapshot)


def test_tcp_replaces_context_slots_at_block_8_only(learner):
    with torch.no_grad():
        tokens = learner.class_aware_tokens()
    replaced = learner_block_inputs(learner)
    plain = plain_block_inputs(learner)
    for i in range(8):
        torch.testing.assert_close(replaced[i], plain[i], rtol=0, atol=0)
    torch.testing.assert_close(replaced[8][:, 1:5], tokens, rtol=0, atol=0)
    torch.testing.assert_close(replaced[8][:, :1], plain[8][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(replaced[8][:, 5:], plain[8][:, 5:], rtol=0, atol=0)
    assert not torch.allclose(replaced[8][:, 1:5], plain[8][:, 1:5])


def test_tcp_blend_at_configured_blocks():
    learner = build_learner("tcp", toy_backbone(), TCPConfig(text_blocks=(3, 8), text_blend_weight=0.5))
    learner.set_classnames(BASE)
    with torch.no_grad():
        tokens = learner.class_aware_tokens()
    plain = plain_block_inputs(learner)
    replaced = learner_block_inputs(learner)
    torch.testing.assert_close(replaced[3][:, 1:5], 0.5 * tokens + 0.5 * plain[3][:, 1:5])
    torch.testing.assert_close(replaced[3][:, 5:], plain[3][:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(replaced[2], plain[2], rtol=0, atol=0)


def test_tcp_rejects_text_tower_shallower_than_block_8():
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg={"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 6},
        quick_gelu=True,
    )
    shallow = ClipBackbone(model, open_clip.get_tokenizer("ViT-B-16"), "toy-6-layers", "none")
    with pytest.raises(ValueError, match="text_layers=6") as error:
        build_learner("tcp", shallow)
    assert "text_blocks" in str(error.value)
    assert build_learner("tcp", shallow, TCPConfig(text_blocks=(5,))).n_ctx == 4


def test_tcp_templates_by_dataset():
    def classes(dataset, template="a photo of a {}."):
        return ClassSet(("x",), template, dataset)

    assert tcp_prompt_template(classes("oxford_pets")) == "{}, a type of pet."
    assert tcp_prompt_template(classes("stanford_cars")) == "{}, a type of car"
    assert tcp_prompt_template(classes("ucf101")) == "person doing {}."
    assert tcp_prompt_template(classes("imagenet_r")) == "{}."
    assert tcp_prompt_template(classes("digits")) == "{}."
    assert tcp_handcrafted_template(classes("fgvc_aircraft")) == "a photo of an aircraft {}."
    assert tcp_handcrafted_template(classes("food101", "a photo of {}, a type of food.")) == (
        "a photo of a {}, a type of food."
    )
    assert tcp_handcrafted_template(classes("digits", "a photo of the digit {}.")) == "a photo of the digit {}."


def test_tcp_prompt_suffix_follows_dataset_table():
    learner = build_learner("tcp", toy_backbone())
    learner.set_classnames(ClassSet(("abyssinian",), "a photo of a {}, a type of pet.", "oxford_pets"))
    backbone = learner.backbone
    ids = backbone.tokenize(["X X X X abyssinian, a type of pet."])
    torch.testing.assert_close(learner.token_suffix, backbone.token_embedding(ids)[:, 5:], rtol=0, atol=0)
    expected = backbone.encode_prompts(["a photo of a abyssinian, a type of pet."], normalize=True)
    torch.testing.assert_close(learner.handcrafted_features, expected)


def test_tcp_kg_term(learner):
    images, labels = base_batch(2)
    _, terms = learner.loss_terms(images, labels)
    expected = 8.0 * knowledge_guided_distance(learner.text_features(), learner.handcrafted_features)
    torch.testing.assert_close(terms["kg"], expected)
    weighted = build_learner("tcp", learner.backbone, TCPConfig(kg_weight=2.0))
    weighted.load_learnable_state_dict(learner.learnable_state_dict())
    weighted.set_classnames(BASE)
    _, terms = weighted.loss_terms(images, labels)
    torch.testing.assert_close(terms["kg"], expected / 4.0)


def test_tcp_checkpoint_round_trip_and_novel_switch(learner, tmp_path):
    fresh = check_round_trip_and_novel_switch(learner, tmp_path)
    with torch.no_grad():
        # TKE maps the novel classes' hand-crafted features to their own class-aware tokens.
        assert fresh.class_aware_tokens().shape == (3, 4, 64)
        torch.testing.assert_close(fresh.class_aware_tokens().flatten(1), fresh.tke(fresh.handcrafted_features))


def test_vit_b16_trainable_parameter_counts():
    backbone = load_backbone("ViT-B-16", "none")
    assert build_learner("cocoop", backbone).num_trainable_parameters() == 35_360
    assert build_learner("kgcoop", backbone).num_trainable_parameters() == 2_048
    assert build_learner("tcp", backbone).num_trainable_parameters() == 331_904
    bip = build_learner("bip", backbone)
    # Without classes BIP has no prototype rows; each class adds one E = 512 row.
    assert bip.num_trainable_parameters() == 796_928
    bip.set_classnames(ClassSet(("cat", "dog"), "a photo of a {}.", "oxford_pets"))
    assert bip.num_trainable_parameters() == 796_928 + 2 * 512


@pytest.mark.slow
def test_tcp_base2novel_cli(tmp_path, tmp_path_factory):
    results = run_base2novel_cli("tcp", shared_digits_root(tmp_path_factory), tmp_path, "--set", "batch_size=4")
    assert results["trainable_params"] == TOY_PARAMS
    assert set(results["loss_terms"]) >= {"ce", "kg", "loss"}
    train = results["config"]["train"]
    assert (train["optimizer"], train["adam_eps"], train["epochs"]) == ("adam", 1e-3, 1)
    assert results["config"]["method"]["text_blocks"] == [8]

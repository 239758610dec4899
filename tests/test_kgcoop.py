"""KgCoOp: the knowledge-guided term, its templates, checkpoints and base to novel."""

from __future__ import annotations

import pytest
import torch

from learners import ClassSet, build_learner
from learners.kgcoop import KgCoOpConfig, kgcoop_template
from learners.losses import knowledge_guided_distance

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


@pytest.fixture()
def learner():
    torch.manual_seed(2)
    model = build_learner("kgcoop", toy_backbone())
    model.set_classnames(BASE)
    return model


def test_kgcoop_output_shapes(learner):
    images, _ = base_batch(3)
    assert learner.ctx.shape == (4, 64)
    assert learner.handcrafted_features.shape == (5, 64)
    assert learner.text_features().shape == (5, 64)
    assert learner(images).shape == (3, 5)


def test_kgcoop_trains_only_context(learner):
    assert trainable_names(learner) == {"ctx"}
    assert set(learner.learnable_state_dict()) == {"ctx"}
    snapshot = backbone_snapshot(learner.backbone)
    ctx_before = learner.ctx.detach().clone()
    terms = train_steps(learner, *base_batch(2))
    assert set(terms) == {"ce", "kg"}
    assert not torch.equal(learner.ctx, ctx_before)
    assert_backbone_unchanged(learner.backbone, snapshot)


def test_kg_term_zero_when_prompt_equals_handcrafted():
    # ctx "a photo of a" + " {class}." is token for token the hand-crafted "a photo of a {class}.".
    learner = build_learner("kgcoop", toy_backbone(), KgCoOpConfig(handcrafted_template="a photo of a {}."))
    learner.set_classnames(BASE)
    _, terms = learner.loss_terms(*base_batch(2))
    assert float(terms["kg"]) == pytest.approx(0.0, abs=1e-6)


def test_kg_term_is_weighted_distance(learner):
    # The digits template "a photo of the digit {}." differs from the learned prompt.
    images, labels = base_batch(2)
    _, terms = learner.loss_terms(images, labels)
    distance = knowledge_guided_distance(learner.text_features(), learner.handcrafted_features)
    assert float(distance) > 1e-4
    torch.testing.assert_close(terms["kg"], 8.0 * distance)
    with torch.no_grad():
        learner.ctx.add_(0.5 * torch.randn_like(learner.ctx))
    _, moved = learner.loss_terms(images, labels)
    assert float(moved["kg"]) != pytest.approx(float(terms["kg"]))


def test_kgcoop_template_table():
    names = ("banded",)
    assert kgcoop_template(ClassSet(names, "{} texture.", "dtd")) == "a photo of a {}, a type of texture."
    assert kgcoop_template(ClassSet(names, "a centered satellite photo of {}.", "eurosat")) == (
        "a centered satellite photo of {}."
    )
    assert kgcoop_template(ClassSet(names, "a photo of a {}, a type of pet.", "oxford_pets")) == (
        "a photo of a {}, a type of pet."
    )
    assert kgcoop_template(ClassSet(names, "a photo of the digit {}.", None)) == "a photo of the digit {}."


def test_kgcoop_handcrafted_features_follow_class_set(learner):
    learner.set_classnames(NOVEL_3)
    expected = learner.backbone.encode_prompts(NOVEL_3.prompts(), normalize=True)
    assert learner.handcrafted_features.shape == (3, 64)
    torch.testing.assert_close(learner.handcrafted_features, expected)
    images, _ = base_batch(2)
    _, terms = learner.loss_terms(images, torch.tensor([0, 2]))
    expected_kg = 8.0 * knowledge_guided_distance(learner.text_features(), expected)
    torch.testing.assert_close(terms["kg"], expected_kg)


def test_kgcoop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kg_weight"):
        KgCoOpConfig(kg_weight=-1.0)
    with pytest.raises(ValueError, match="handcrafted_template"):
        KgCoOpConfig(handcrafted_template="a photo")


def test_kgcoop_checkpoint_round_trip_and_novel_switch(learner, tmp_path):
    check_round_trip_and_novel_switch(learner, tmp_path)


@pytest.mark.slow
def test_kgcoop_base2novel_cli(tmp_path, tmp_path_factory):
    results = run_base2novel_cli("kgcoop", shared_digits_root(tmp_path_factory), tmp_path, "--set", "batch_size=4")
    assert results["trainable_params"] == 4 * 64
    assert set(results["loss_terms"]) >= {"ce", "kg", "loss"}
    assert results["loss_terms"]["kg"] > 0.0
    assert results["config"]["method"]["kg_weight"] == 8.0
    assert results["config"]["train"]["batch_size"] == 4

"""PromptSRC: the self-regulating terms and their frozen targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from learners import build_learner, templates
from learners.losses import l1_consistency, logit_distillation_kl
from learners.promptsrc import PromptSRCConfig
from learners.templates import IMAGENET_TEMPLATES, PROMPTSRC_TEMPLATES, get_ensemble
from tests.tcp_family_support import BASE, NOVEL_3, base_batch, toy_backbone


def make(**overrides):
    torch.manual_seed(0)
    learner = build_learner("promptsrc", toy_backbone(), **overrides)
    learner.set_classnames(BASE)
    return learner


def test_promptsrc_template_list():
    assert get_ensemble("promptsrc60") == PROMPTSRC_TEMPLATES
    assert len(PROMPTSRC_TEMPLATES) == 60
    assert len(set(PROMPTSRC_TEMPLATES)) == 60
    assert set(PROMPTSRC_TEMPLATES) == set(IMAGENET_TEMPLATES[:60])
    assert "itap of a {}." not in PROMPTSRC_TEMPLATES


def test_terms_match_hand_computation():
    learner = make()
    backbone = learner.backbone
    images, labels = base_batch(4)
    logits, terms = learner.loss_terms(images, labels)
    assert list(terms) == ["ce", "scl_text", "scl_image", "scl_logits"]

    with torch.no_grad():
        unnormalized = torch.stack(
            [backbone.encode_prompts(BASE.prompts(t), normalize=False) for t in PROMPTSRC_TEMPLATES]
        )  # (T, K, E)
        frozen_text = F.normalize(unnormalized.mean(dim=0), dim=-1)
        frozen_image = backbone.encode_image(images)
        image_features, text_features = learner.features(images)
        zero_shot = backbone.logit_scale * F.normalize(frozen_image, dim=-1) @ frozen_text.t()
    assert torch.allclose(learner.frozen_text_targets(), frozen_text, atol=1e-5)
    assert torch.allclose(terms["ce"], F.cross_entropy(logits, labels))
    assert torch.allclose(terms["scl_text"], 25 * l1_consistency(text_features, frozen_text), atol=1e-5)
    assert torch.allclose(terms["scl_image"], 10 * l1_consistency(image_features, frozen_image), atol=1e-5)
    assert torch.allclose(terms["scl_logits"], logit_distillation_kl(logits, zero_shot), atol=1e-6)
    for name, term in terms.items():
        value = term.item()
        assert math.isfinite(value), f"{name} is {value}"
        assert value > 0, f"{name} is {value}"


def test_terms_vanish_without_prompts(monkeypatch):
    # Without deep or vision prompts, "a photo of a" context and a one-template ensemble of the
    # same prompt, the prompted model equals the frozen one: every self-regulating term is zero.
    monkeypatch.setitem(templates.TEMPLATE_ENSEMBLES, "photo1", ("a photo of a {}.",))
    learner = make(depth_text=1, depth_vision=0, templates="photo1")
    images, labels = base_batch(4)
    _, terms = learner.loss_terms(images, labels)
    assert float(terms["scl_text"]) < 1e-5
    assert float(terms["scl_image"]) == 0.0
    assert float(terms["scl_logits"]) < 1e-6
    assert float(terms["ce"]) > 0


def test_zero_weights_drop_terms():
    learner = make(text_loss_weight=0.0, image_loss_weight=0.0, logit_loss_weight=0.0)
    images, labels = base_batch(4)
    _, terms = learner.loss_terms(images, labels)
    assert list(terms) == ["ce"]


def test_weight_scales_its_term():
    images, labels = base_batch(4)
    _, single = make().loss_terms(images, labels)
    _, double = make(text_loss_weight=50.0).loss_terms(images, labels)
    assert torch.allclose(double["scl_text"], 2 * single["scl_text"])
    assert torch.allclose(double["scl_image"], single["scl_image"])


def test_frozen_targets_follow_class_switch():
    learner = make()
    base_targets = learner.frozen_text_targets().clone()
    assert base_targets.shape == (len(BASE), learner.backbone.embed_dim)
    learner.set_classnames(NOVEL_3)
    assert learner.frozen_text_features.numel() == 0
    novel_targets = learner.frozen_text_targets()
    assert novel_targets.shape == (len(NOVEL_3), learner.backbone.embed_dim)
    assert not torch.allclose(novel_targets[:3], base_targets[:3])


def test_no_second_backbone_copy():
    learner = make()
    images, _ = base_batch(2)
    assert all(not key.startswith(("backbone", "model", "visual")) for key in learner.state_dict())
    assert torch.equal(learner.frozen_image_features(images), learner.backbone.encode_image(images))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown template ensemble 'nope'"):
        PromptSRCConfig(templates="nope")
    with pytest.raises(ValueError, match="gpa_std must be > 0"):
        PromptSRCConfig(gpa_std=0.0)
    with pytest.raises(ValueError, match="text_loss_weight must be >= 0"):
        PromptSRCConfig(text_loss_weight=-1.0)

"""CoPrompt: adapters, consistency terms, descriptions, second view and per-dataset overrides."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from learners import ClassSet, build_learner
from learners.coprompt import CoPromptConfig, load_descriptions, match_descriptions
from learners.base import template_ensemble_features
from learners.templates import IMAGENET_TEMPLATES
from strategies.experiment import RunSettings, resolve_configs
from tests.tcp_family_support import BASE, base_batch, toy_backbone

DESCRIPTIONS = {
    "zero": ["a round digit with a hole in the middle.", "the digit zero, an oval."],
    "one": ["a single vertical stroke."],
    "two": ["a curve on top of a flat base."],
    "three": ["two bumps open to the left."],
    "four": ["a cross with a closed triangle."],
}


def make(**overrides):
    torch.manual_seed(0)
    learner = build_learner("coprompt", toy_backbone(), **overrides)
    learner.set_classnames(BASE)
    return learner


def write_descriptions(path, data=DESCRIPTIONS):
    path.write_text(json.dumps(data))
    return str(path)


def test_zero_adapter_ratios_give_maple_logits():
    coprompt = make(image_adapter_ratio=0.0, text_adapter_ratio=0.0)
    maple = build_learner("maple", toy_backbone())
    maple.set_classnames(BASE)
    maple_state = {k: v for k, v in coprompt.learnable_state_dict().items() if "adapter" not in k}
    maple.load_learnable_state_dict(maple_state)
    images, _ = base_batch(3)
    with torch.no_grad():
        assert torch.allclose(coprompt(images), maple(images), atol=1e-5)
        assert not torch.allclose(make()(images), maple(images), atol=1e-5)


def test_adapter_mixing_ratio():
    learner = make()
    images, _ = base_batch(3)
    with torch.no_grad():
        tokens = learner.prompt_tokens()
        raw_image = learner.encode_images(images, tokens)
        raw_text = learner.encode_text(tokens)
        image, text = learner.features(images)
    assert torch.allclose(image, 0.1 * learner.image_adapter(raw_image) + 0.9 * raw_image, atol=1e-6)
    assert torch.allclose(text, 0.2 * learner.text_adapter(raw_text) + 0.8 * raw_text, atol=1e-6)
    assert learner.image_adapter[0].bias is None
    assert learner.image_adapter[2].bias is None


def test_terms_with_two_given_views(tmp_path):
    single = {name: sentences[:1] for name, sentences in DESCRIPTIONS.items()}
    learner = make(descriptions_file=write_descriptions(tmp_path / "d.json", single), consistency_weight=2.0)
    backbone = learner.backbone
    view1, labels = base_batch(4)
    view2 = torch.flip(view1, dims=[3])
    logits, terms = learner.loss_terms(torch.stack([view1, view2], dim=1), labels)
    assert list(terms) == ["ce", "text_consistency", "image_consistency"]

    with torch.no_grad():
        image, text = learner.features(view1)
        described = backbone.encode_prompts([single[name][0] for name in BASE.classnames], normalize=True)
        frozen = backbone.encode_image(view2)
    assert torch.allclose(logits, learner.cosine_logits(image, text), atol=1e-5)
    expected_text = 2.0 * (1 - F.cosine_similarity(text, described).mean())
    expected_image = 2.0 * (1 - F.cosine_similarity(image, frozen).mean())
    assert torch.allclose(terms["text_consistency"], expected_text, atol=1e-5)
    assert torch.allclose(terms["image_consistency"], expected_image, atol=1e-5)


def test_descriptions_cycle_for_short_classes(tmp_path):
    learner = make(descriptions_file=write_descriptions(tmp_path / "d.json"))
    targets = learner.description_targets()
    assert targets.shape == (2, len(BASE), learner.backbone.embed_dim)
    # "one" has a single sentence, so both rows hold it; "zero" has two different ones.
    assert torch.equal(targets[0, 1], targets[1, 1])
    assert not torch.allclose(targets[0, 0], targets[1, 0])
    expected = learner.backbone.encode_prompts(DESCRIPTIONS["zero"], normalize=True)
    assert torch.allclose(targets[:, 0], expected, atol=1e-6)


def test_dataset_placeholder_in_path(tmp_path):
    write_descriptions(tmp_path / "digits.json")
    learner = build_learner("coprompt", toy_backbone(), descriptions_file=str(tmp_path / "{dataset}.json"))
    learner.set_classnames(ClassSet(BASE.classnames, BASE.template, "digits"))
    assert learner.description_targets().shape[0] == 2
    learner.set_classnames(ClassSet(BASE.classnames, BASE.template, None))
    with pytest.raises(ValueError, match="has no dataset name"):
        learner.description_targets()


def test_class_set_descriptions_win(tmp_path):
    learner = build_learner("coprompt", toy_backbone(), descriptions_file=str(tmp_path / "missing.json"))
    single = {name: sentences[:1] for name, sentences in DESCRIPTIONS.items()}
    learner.set_classnames(ClassSet(BASE.classnames, BASE.template, "digits", descriptions=single))
    assert learner.description_targets().shape[0] == 1


def test_fallback_to_templates_is_logged(caplog):
    learner = make()
    with caplog.at_level(logging.WARNING, logger="learners.coprompt"):
        targets = learner.description_targets()
    assert "imagenet80 template ensemble" in caplog.text
    expected = template_ensemble_features(learner.backbone, BASE, IMAGENET_TEMPLATES, normalize_each=True)
    assert torch.allclose(targets[0], expected, atol=1e-6)
    assert torch.allclose(expected, learner.class_prompt_features(BASE, IMAGENET_TEMPLATES), atol=1e-5)


def test_bad_description_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="descriptions_file .* not found"):
        load_descriptions(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_descriptions(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"zero": []}))
    with pytest.raises(ValueError, match="class 'zero' must map to a non-empty list"):
        load_descriptions(tmp_path / "empty.json")
    with pytest.raises(ValueError, match=r"no entry for 1 of 2 classes, e.g. \['seven'\]"):
        match_descriptions({"Zero": ["x"]}, ["zero", "seven"])


def test_second_view_augments_each_image():
    learner = make()
    images, _ = base_batch(6)
    torch.manual_seed(1)
    augmented = learner.second_view(images)
    assert augmented.shape == images.shape
    assert augmented.dtype == images.dtype
    assert any(not torch.allclose(a, b, atol=1e-2) for a, b in zip(augmented, images))
    assert torch.equal(make(view_augment_ops=0).second_view(images), images)


def test_second_view_round_trips_pixels():
    learner = make()
    object.__setattr__(learner, "_view_augment", lambda image: image)
    images, _ = base_batch(2)
    # De-normalizing, quantizing to 8 bits and normalizing again moves pixels by < 1/255 / std.
    assert torch.allclose(learner.second_view(images), images, atol=0.5 / 255 / 0.26 + 1e-6)


def test_zero_weight_keeps_only_ce():
    learner = make(consistency_weight=0.0)
    images, labels = base_batch(4)
    _, terms = learner.loss_terms(images, labels)
    assert list(terms) == ["ce"]


def test_dataset_overrides_and_user_set():
    config, train = resolve_configs(RunSettings(method="coprompt", dataset="eurosat"), "eurosat")
    assert (config.depth, config.n_ctx, config.consistency_weight) == (12, 2, 0.1)
    assert train.epochs == 8
    config, train = resolve_configs(RunSettings(method="coprompt", dataset="food101"), "food101")
    assert (config.depth, config.n_ctx, config.consistency_weight) == (9, 4, 0.5)
    assert train.epochs == 5
    user = RunSettings(method="coprompt", dataset="eurosat", method_overrides={"depth": 9})
    config, _ = resolve_configs(user, "eurosat")
    assert (config.depth, config.n_ctx) == (9, 2)
    config, _ = resolve_configs(RunSettings(method="coprompt", dataset="digits"), "digits")
    assert config == CoPromptConfig()

"""CoOp and zero-shot CLIP on the tiny model: equivalence, training scope, checkpoints, classes."""

from __future__ import annotations

import pytest
import torch

from learners import ClassSet, build_learner, get_method, list_methods, load_backbone, load_checkpoint, save_checkpoint

BASE = ClassSet(("zero", "one", "two", "three", "four"), "a photo of a {}.", "digits")
NOVEL = ClassSet(("five", "six", "seven", "eight", "nine"), "a photo of a {}.", "digits")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("toy-clip", "none")


@pytest.fixture()
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_coop_from_phrase_scores_like_zero_shot(backbone, images):
    zeroshot = build_learner("zeroshot", backbone)
    coop = build_learner("coop", backbone, ctx_init="a photo of a")
    zeroshot.set_classnames(BASE)
    coop.set_classnames(BASE)
    with torch.no_grad():
        torch.testing.assert_close(coop(images), zeroshot(images), rtol=0, atol=1e-4)
    assert coop.ctx.shape == (4, backbone.text_width)


def test_only_context_trains(backbone, images):
    coop = build_learner("coop", backbone)
    coop.set_classnames(BASE)
    assert [n for n, p in coop.named_parameters() if p.requires_grad] == ["ctx"]
    assert coop.num_trainable_parameters() == 4 * backbone.text_width
    logits, terms = coop.loss_terms(images, torch.tensor([0, 1, 2, 3]))
    sum(terms.values()).backward()
    assert coop.ctx.grad is not None and coop.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def test_random_init_and_class_token_positions(backbone, images):
    torch.manual_seed(0)
    outputs = {}
    for position in ("end", "middle", "front"):
        torch.manual_seed(0)
        coop = build_learner("coop", backbone, ctx_init=None, n_ctx=16, class_token_position=position)
        coop.set_classnames(BASE)
        assert coop.ctx.shape == (16, backbone.text_width)
        assert abs(float(coop.ctx.std()) - 0.02) < 0.005
        with torch.no_grad():
            outputs[position] = coop(images)
    assert not torch.allclose(outputs["end"], outputs["middle"])
    assert not torch.allclose(outputs["end"], outputs["front"])


def test_novel_classes_use_trained_context(backbone, images):
    coop = build_learner("coop", backbone)
    coop.set_classnames(BASE)
    with torch.no_grad():
        coop.ctx.add_(0.1)
    trained = coop.ctx.detach().clone()
    coop.set_classnames(NOVEL)
    assert torch.equal(coop.ctx, trained)
    assert coop(images).shape == (4, 5)


def test_checkpoint_round_trip_restores_logits(tmp_path, backbone, images):
    coop = build_learner("coop", backbone)
    coop.set_classnames(BASE)
    with torch.no_grad():
        coop.ctx.normal_()
        expected = coop(images)
    path = save_checkpoint(tmp_path / "coop.pt", coop)
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == {"ctx"}
    assert saved["backbone"]["model"] == "toy-clip"
    restored = build_learner("coop", backbone)
    restored.set_classnames(BASE)
    load_checkpoint(path, restored)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), expected)


def test_checkpoint_rejects_other_context_length(tmp_path, backbone):
    coop = build_learner("coop", backbone)
    coop.set_classnames(BASE)
    path = save_checkpoint(tmp_path / "coop.pt", coop)
    other = build_learner("coop", backbone, ctx_init=None, n_ctx=8)
    other.set_classnames(BASE)
    with pytest.raises(ValueError, match=r"config fields ctx_init .*n_ctx \(checkpoint 4, learner 8\)"):
        load_checkpoint(path, other)
    with pytest.raises(ValueError, match=r"shape mismatches \['ctx: checkpoint \(4, 64\) vs learner \(8, 64\)'\]"):
        other.load_learnable_state_dict(torch.load(path, weights_only=True)["state_dict"])


def test_checkpoint_rejects_other_method(tmp_path, backbone):
    coop = build_learner("coop", backbone)
    coop.set_classnames(BASE)
    path = save_checkpoint(tmp_path / "coop.pt", coop)
    zeroshot = build_learner("zeroshot", backbone)
    zeroshot.set_classnames(BASE)
    with pytest.raises(ValueError, match="method: checkpoint 'coop' vs learner 'zeroshot'"):
        load_checkpoint(path, zeroshot)


def test_class_specific_context_rejects_other_class_count(backbone):
    coop = build_learner("coop", backbone, class_specific=True, ctx_init=None, n_ctx=2)
    coop.set_classnames(BASE)
    assert coop.ctx.shape == (5, 2, backbone.text_width)
    with pytest.raises(ValueError, match="learned for 5 classes and cannot score 3"):
        coop.set_classnames(ClassSet(("a", "b", "c")))


def test_deepcopy_shares_the_frozen_backbone(backbone):
    import copy

    coop = build_learner("coop", backbone)
    coop.set_classnames(BASE)
    clone = copy.deepcopy(coop)
    assert clone.backbone is backbone
    assert clone.ctx is not coop.ctx
    assert sum(p.numel() for p in clone.parameters()) == coop.num_trainable_parameters()


def test_registry_suggests_close_names():
    assert "coop" in list_methods()
    matches = list_methods("co*")
    assert "coop" in matches
    assert all(name.startswith("co") for name in matches)
    with pytest.raises(ValueError, match=r"unknown method 'cop'\. Did you mean 'coop'"):
        get_method("cop")


def test_invalid_coop_config_names_the_value():
    from learners.coop import CoOpConfig

    with pytest.raises(ValueError, match="class_token_position must be .* got 'left'"):
        CoOpConfig(class_token_position="left")
    with pytest.raises(ValueError, match="n_ctx must be >= 1, got 0"):
        CoOpConfig(n_ctx=0, ctx_init=None)


def test_n_ctx_must_match_init_phrase(backbone):
    with pytest.raises(ValueError, match=r"n_ctx=16 does not match ctx_init='a photo of a', which has 4 tokens"):
        build_learner("coop", backbone, n_ctx=16)
    coop = build_learner("coop", backbone, n_ctx=16, ctx_init=None)
    assert coop.ctx.shape == (16, backbone.text_width)

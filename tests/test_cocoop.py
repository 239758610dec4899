"""CoCoOp: per-image context shift, chunked B x K text encoding, checkpoints, base to novel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from learners import build_learner
from learners.cocoop import CoCoOpConfig

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

TOY_PARAMS = 4 * 64 + (64 * 4 + 4) + (4 * 64 + 64)  # ctx + meta-net 64 -> 4 -> 64


@pytest.fixture()
def learner():
    torch.manual_seed(1)
    model = build_learner("cocoop", toy_backbone())
    model.set_classnames(BASE)
    return model


def test_cocoop_output_shapes(learner):
    images, _ = base_batch(3)
    features = learner.backbone.encode_image(images)
    context = learner.conditioned_context(features)
    assert learner.ctx.shape == (4, 64)
    assert context.shape == (3, 4, 64)
    assert learner.conditional_text_features(context).shape == (3, 5, 64)
    assert learner(images).shape == (3, 5)


def test_cocoop_trains_only_context_and_meta_net(learner):
    assert trainable_names(learner) == {
        "ctx",
        "meta_net.linear1.weight",
        "meta_net.linear1.bias",
        "meta_net.linear2.weight",
        "meta_net.linear2.bias",
    }
    assert learner.num_trainable_parameters() == TOY_PARAMS
    assert set(learner.learnable_state_dict()) == trainable_names(learner)
    snapshot = backbone_snapshot(learner.backbone)
    ctx_before = learner.ctx.detach().clone()
    terms = train_steps(learner, *base_batch(2))
    assert set(terms) == {"ce"}
    assert not torch.equal(learner.ctx, ctx_before)
    assert_backbone_unchanged(learner.backbone, snapshot)


def test_meta_net_shifts_every_context_token_equally(learner):
    images, _ = base_batch(2)
    with torch.no_grad():
        features = learner.backbone.encode_image(images)
        context = learner.conditioned_context(features)
        expected_shift = learner.meta_net(F.normalize(features, dim=-1))  # (B, D)
    shift = context - learner.ctx.detach().unsqueeze(0)  # (B, M, D)
    for b in range(2):
        for m in range(4):
            torch.testing.assert_close(shift[b, m], expected_shift[b], rtol=0, atol=1e-6)
    # Two different images get two different shifts.
    assert not torch.allclose(expected_shift[0], expected_shift[1])


def test_cocoop_logits_use_each_images_context(learner):
    images, _ = base_batch(2)
    backbone = learner.backbone
    with torch.no_grad():
        logits = learner(images)
        features = backbone.encode_image(images)
        context = learner.conditioned_context(features)
        for b in range(2):
            embeddings = torch.cat(
                [learner.token_prefix, context[b].unsqueeze(0).expand(5, -1, -1), learner.token_suffix], dim=1
            )
            text = F.normalize(backbone.encode_text_tokens(embeddings, learner.eot_index), dim=-1)
            expected = backbone.logit_scale * F.normalize(features[b], dim=-1) @ text.t()
            torch.testing.assert_close(logits[b], expected, rtol=1e-5, atol=1e-4)


def test_cocoop_chunked_encoding_matches_one_pass(learner):
    images, _ = base_batch(3)
    chunked = build_learner("cocoop", learner.backbone, CoCoOpConfig(text_chunk_size=4))
    chunked.load_learnable_state_dict(learner.learnable_state_dict())
    chunked.set_classnames(BASE)
    with torch.no_grad():
        torch.testing.assert_close(chunked(images), learner(images), rtol=1e-5, atol=1e-4)


def test_cocoop_config_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="text_chunk_size"):
        CoCoOpConfig(text_chunk_size=0)


def test_cocoop_checkpoint_round_trip_and_novel_switch(learner, tmp_path):
    check_round_trip_and_novel_switch(learner, tmp_path)


@pytest.mark.slow
def test_cocoop_base2novel_cli(tmp_path, tmp_path_factory):
    results = run_base2novel_cli("cocoop", shared_digits_root(tmp_path_factory), tmp_path)
    assert results["method"] == "cocoop"
    assert results["trainable_params"] == TOY_PARAMS
    assert set(results["loss_terms"]) >= {"ce", "loss"}
    assert results["config"]["train"]["batch_size"] == 1
    assert results["config"]["method"]["text_chunk_size"] == 1024
    assert 0.0 <= results["novel_accuracy"] <= 100.0

"""PLOT and PLOT++: the Sinkhorn solver against POT, the transport logits, the local features of
ResNet towers, PLOT++'s two stages, checkpoints and one base-to-novel run of each."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import open_clip
import ot as pot
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from learners import ClassSet, TrainConfig, get_method, load_backbone, parse_overrides
from learners.checkpoint import load_checkpoint, save_checkpoint
from learners.ot import TransportPlanError, sinkhorn, transport_scores, uniform_sinkhorn_plan
from learners.plot import PLOT, PLOTConfig, encode_local_features
from learners.plotpp import DATASET_CTX_INITS, DEFAULT_CTX_INITS, PLOTPP, PLOTPPConfig
from learners.prompts import phrase_embedding

DIGITS = ("zero", "one", "two", "three", "four")
NOVEL = ("five", "six", "seven")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("toy-clip", "none")


@pytest.fixture(scope="module")
def digit_images():
    """Eight real 8x8 digit images upscaled to toy-clip's 32 px, normalized, with their labels."""
    digits = load_digits()
    pixels = torch.tensor(digits.images[:8], dtype=torch.float32) / 16.0  # (B, 8, 8)
    images = F.interpolate(pixels[:, None], size=32, mode="bicubic").clamp(0, 1).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    labels = torch.tensor(digits.target[:8]) % len(DIGITS)
    return (images - mean) / std, labels


def make_learner(backbone, cls, seed=0, classes=DIGITS, **overrides):
    torch.manual_seed(seed)
    learner = cls(backbone, cls.config_class(**overrides))
    learner.set_classnames(ClassSet(classes))
    return learner


# ------------------------------------------------------------------------------------------------
# Sinkhorn


def random_costs(j=6, m=7, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(j, m, n, generator=generator, dtype=torch.float64) * 2.0  # cosine costs in [0, 2]


def test_sinkhorn_matches_pot_same_iterations():
    cost = random_costs()
    j, m, n = cost.shape
    epsilon = 0.1
    for iterations in (1, 3, 7):
        ours = sinkhorn(
            torch.exp(-cost / epsilon),
            torch.full((j, m), 1.0 / m, dtype=torch.float64),
            torch.full((j, n), 1.0 / n, dtype=torch.float64),
            max_iter=iterations,
            tolerance=0.0,
        )
        for i in range(j):
            # POT scales the column side first, so the transposed problem runs the same updates.
            reference = pot.sinkhorn(
                np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost[i].T.numpy(), epsilon,
                numItermax=iterations, stopThr=0.0, warn=False,
            ).T
            np.testing.assert_allclose(ours[i].numpy(), reference, rtol=1e-10, atol=1e-14)


def test_sinkhorn_converged_matches_pot():
    cost = random_costs(seed=1)
    j, m, n = cost.shape
    epsilon = 0.1
    ours = sinkhorn(
        torch.exp(-cost / epsilon),
        torch.full((j, m), 1.0 / m, dtype=torch.float64),
        torch.full((j, n), 1.0 / n, dtype=torch.float64),
        max_iter=5000,
        tolerance=1e-14,
    )
    for i in range(j):
        reference = pot.sinkhorn(np.full(m, 1.0 / m), np.full(n, 1.0 / n), cost[i].numpy(), epsilon, numItermax=20000, stopThr=1e-13)
        np.testing.assert_allclose(ours[i].numpy(), reference, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ours.sum(dim=2).numpy(), np.full((j, m), 1.0 / m), atol=1e-12)
    np.testing.assert_allclose(ours.sum(dim=1).numpy(), np.full((j, n), 1.0 / n), atol=1e-12)


def test_float32_plan_close_to_pot():
    cost = random_costs(seed=2)
    j, m, n = cost.shape
    plan = uniform_sinkhorn_plan(cost.float(), epsilon=0.1, max_iter=1000, tolerance=0.0)
    assert plan.dtype == torch.float32
    for i in range(j):
        reference = pot.sinkhorn(np.full(m, 1.0 / m), np.full(n, 1.0 / n), cost[i].numpy(), 0.1, numItermax=20000, stopThr=1e-13)
        np.testing.assert_allclose(plan[i].numpy(), reference, atol=1e-6)


def test_sinkhorn_stops_early_at_tolerance():
    cost = random_costs(seed=3).float()
    stopped = uniform_sinkhorn_plan(cost, epsilon=0.1, max_iter=100, tolerance=1e-2)
    counts = [k for k in range(1, 101) if torch.equal(uniform_sinkhorn_plan(cost, 0.1, k, 0.0), stopped)]
    assert counts, "the stopped plan equals no fixed-count plan"
    assert counts[0] < 100
    # Column marginals are exact after each iteration; the rows are within the tolerance's reach.
    torch.testing.assert_close(stopped.sum(dim=1), torch.full((cost.shape[0], cost.shape[2]), 0.25))
    assert float((stopped.sum(dim=2) - 1.0 / cost.shape[1]).abs().max()) < 0.05


def test_transport_plan_nan_raises():
    cost = random_costs().float()
    cost[2, 1, 1] = float("nan")
    with pytest.raises(TransportPlanError, match="NaN or infinite entries in 1 of 6"):
        uniform_sinkhorn_plan(cost)
    with pytest.raises(TransportPlanError, match="raise ot_epsilon"):
        uniform_sinkhorn_plan(torch.ones(2, 3, 4), epsilon=1e-3)


def test_plan_float32_under_autocast():
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(4, 6, 16, generator=generator)
    prompts = torch.randn(4, 3, 16, generator=generator)
    exact = transport_scores(features, prompts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = transport_scores(features, prompts)
        plan = uniform_sinkhorn_plan(1.0 - torch.rand(5, 6, 4, generator=generator).to(torch.bfloat16))
    assert plan.dtype == torch.float32
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), exact, rtol=0, atol=3e-2)


def test_transport_scores_match_pot_plan():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(3, 5, 8, generator=generator)
    prompts = torch.randn(4, 2, 8, generator=generator)
    scores = transport_scores(features, prompts, epsilon=0.1, max_iter=2000, tolerance=0.0)
    assert scores.shape == (3, 2)
    cos = torch.einsum("bme,nke->bkmn", F.normalize(features, dim=-1), F.normalize(prompts, dim=-1)).double()
    for b in range(3):
        for k in range(2):
            plan = pot.sinkhorn(np.full(5, 0.2), np.full(4, 0.25), (1 - cos[b, k]).numpy(), 0.1, numItermax=20000, stopThr=1e-13)
            assert float(scores[b, k]) == pytest.approx(float((torch.from_numpy(plan) * cos[b, k]).sum()), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# PLOT


def test_plot_shapes_and_trainable(backbone, digit_images):
    images, labels = digit_images
    learner = make_learner(backbone, PLOT)
    assert learner.ctx.shape == (4, 16, 64)
    assert learner.num_trainable_parameters() == 4 * 16 * 64
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    assert learner.text_features().shape == (4, len(DIGITS), 64)
    global_features, local_features = encode_local_features(backbone, images)
    assert global_features.shape == (8, 64)
    assert local_features.shape == (8, 16, 64)  # (32 / 8)^2 patches
    logits, terms = learner.loss_terms(images, labels)
    assert logits.shape == (8, len(DIGITS))
    assert list(terms) == ["ce"]
    terms["ce"].backward()
    assert learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def test_plot_uniform_plan_is_mean_pooling(backbone, digit_images):
    images, _ = digit_images
    learner = make_learner(backbone, PLOT, ot_plan="uniform")
    with torch.no_grad():
        logits = learner(images)
        _, local_features = encode_local_features(backbone, images)
        text = F.normalize(learner.text_features(), dim=-1)  # (N, K, E)
        local = F.normalize(local_features, dim=-1)  # (B, P, E)
        expected = torch.zeros(8, len(DIGITS))
        for b in range(8):
            for k in range(len(DIGITS)):
                expected[b, k] = (local[b] @ text[:, k].T).mean()  # mean over (P, N) cosines
    torch.testing.assert_close(logits, backbone.logit_scale * expected, rtol=1e-5, atol=1e-4)
    sinkhorn_learner = make_learner(backbone, PLOT, ot_plan="sinkhorn")
    with torch.no_grad():
        assert not torch.allclose(sinkhorn_learner(images), logits, atol=1e-3)


def test_plot_global_logits_on_imagenet(backbone, digit_images):
    images, _ = digit_images
    assert get_method("plot").dataset_config_overrides["imagenet"] == {"add_global_logits": True}
    assert PLOTConfig().add_global_logits is False
    plain = make_learner(backbone, PLOT)
    with_global = make_learner(backbone, PLOT, add_global_logits=True)
    with torch.no_grad():
        global_features, _ = encode_local_features(backbone, images)
        text = plain.text_features()
        extra = plain.cosine_logits(global_features, text.mean(dim=0))
        torch.testing.assert_close(with_global(images), plain(images) + extra)


def test_plot_novel_classes_keep_context(backbone, digit_images):
    images, _ = digit_images
    learner = make_learner(backbone, PLOT)
    before = learner.ctx.detach().clone()
    learner.set_classnames(ClassSet(NOVEL))
    assert learner(images).shape == (8, len(NOVEL))
    assert learner.token_prefix.shape[0] == len(NOVEL)
    torch.testing.assert_close(learner.ctx.detach(), before)
    assert set(learner.state_dict()) == {"ctx"}


def test_plot_checkpoint_round_trip(backbone, digit_images, tmp_path):
    images, _ = digit_images
    trained = make_learner(backbone, PLOT, seed=1)
    save_checkpoint(tmp_path / "plot.pt", trained)
    fresh = make_learner(backbone, PLOT, seed=2)
    with torch.no_grad():
        assert not torch.allclose(fresh(images), trained(images))
        load_checkpoint(tmp_path / "plot.pt", fresh)
        torch.testing.assert_close(fresh(images), trained(images), rtol=0, atol=0)


def test_plot_nan_context_raises(backbone, digit_images):
    images, _ = digit_images
    learner = make_learner(backbone, PLOT)
    with torch.no_grad():
        learner.ctx[0, 0, 0] = float("nan")
        with pytest.raises(TransportPlanError, match="not finite"):
            learner(images)


def test_plot_class_token_positions(backbone, digit_images):
    images, _ = digit_images
    features = {}
    for position in ("end", "middle", "front"):
        learner = make_learner(backbone, PLOT, class_token_position=position)
        with torch.no_grad():
            features[position] = learner.text_features()
            assert learner(images).shape == (8, len(DIGITS))
    assert not torch.allclose(features["end"], features["middle"])
    assert not torch.allclose(features["end"], features["front"])


def test_plot_config_validation():
    with pytest.raises(ValueError, match="ot_epsilon must be > 0, got 0"):
        PLOTConfig(ot_epsilon=0)
    with pytest.raises(ValueError, match="ot_plan must be one of"):
        PLOTConfig(ot_plan="greedy")
    with pytest.raises(ValueError, match="n_prompts must be >= 1"):
        PLOTConfig(n_prompts=0)


@pytest.fixture(scope="module")
def resnet_backbone(tmp_path_factory):
    """A tiny open_clip ModifiedResNet CLIP (4 grid positions at 64 px), registered for the test."""
    folder = tmp_path_factory.mktemp("rn_config")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (folder / "test-rn-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return load_backbone("test-rn-tiny", "none")


def test_resnet_local_features_match_attnpool(resnet_backbone):
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 64, 64, generator=generator)
    global_features, local_features = encode_local_features(resnet_backbone, images)
    assert local_features.shape == (3, 4, 32)
    with torch.no_grad():
        reference = resnet_backbone.visual(images)
    torch.testing.assert_close(global_features, reference, rtol=1e-5, atol=1e-5)

    # Every grid position as a query, written out head by head.
    visual, pool = resnet_backbone.visual, resnet_backbone.visual.attnpool
    with torch.no_grad():
        grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        tokens = grid.flatten(2).transpose(1, 2)  # (B, 4, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding
        heads, width = pool.num_heads, tokens.shape[-1]

        def split(x):
            return x.reshape(3, 5, heads, width // heads).transpose(1, 2)  # (B, heads, 5, C/heads)

        q, k, v = split(pool.q_proj(tokens)), split(pool.k_proj(tokens)), split(pool.v_proj(tokens))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        expected = pool.c_proj((weights @ v).transpose(1, 2).reshape(3, 5, width))  # (B, 5, E)
    torch.testing.assert_close(local_features, expected[:, 1:], rtol=1e-4, atol=1e-5)


def test_plot_on_resnet_and_plotpp_rejects_it(resnet_backbone):
    learner = make_learner(resnet_backbone, PLOT)
    assert learner.num_trainable_parameters() == 4 * 16 * 32
    assert learner(torch.randn(2, 3, 64, 64)).shape == (2, len(DIGITS))
    with pytest.raises(NotImplementedError, match="needs a ViT image tower"):
        PLOTPP(resnet_backbone, PLOTPPConfig())


# ------------------------------------------------------------------------------------------------
# PLOT++


def test_plotpp_shapes_and_init(backbone, digit_images):
    images, _ = digit_images
    learner = make_learner(backbone, PLOTPP)
    assert learner.ctx.shape == (4, 4, 64)
    assert learner.visual_ctx.shape == (4, 2, 64)
    for i, phrase in enumerate(DEFAULT_CTX_INITS):
        torch.testing.assert_close(learner.ctx[i].detach(), phrase_embedding(backbone, phrase, 4)[0])
    assert learner.text_features().shape == (4, len(DIGITS), 64)
    features = learner.image_features(images)
    assert features.shape == (8, 4, 64)
    with torch.no_grad():
        for m in range(4):
            single = backbone.encode_image(images, prompts=learner.visual_ctx[m])
            torch.testing.assert_close(features[:, m], single, rtol=1e-4, atol=1e-5)
    assert learner(images).shape == (8, len(DIGITS))
    assert set(learner.state_dict()) == {"ctx", "visual_ctx", "stage"}


def test_plotpp_stage_switch(backbone, digit_images):
    images, labels = digit_images
    learner = make_learner(backbone, PLOTPP)
    assert learner.stage_name == "vision"
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["visual_ctx"]
    assert learner.num_trainable_parameters() == 4 * 2 * 64
    _, terms = learner.loss_terms(images, labels)
    terms["ce"].backward()
    assert learner.ctx.grad is None
    assert learner.visual_ctx.grad is not None

    learner.on_epoch_end(0, 4)  # half of 4 epochs is 2: still stage 1
    assert learner.stage_name == "vision"
    learner.on_epoch_end(1, 4)
    assert learner.stage_name == "joint"
    assert learner.num_trainable_parameters() == 4 * 4 * 64 + 4 * 2 * 64
    learner.zero_grad()
    _, terms = learner.loss_terms(images, labels)
    terms["ce"].backward()
    assert learner.ctx.grad.abs().sum() > 0
    learner.on_epoch_end(0, 4)  # a new experience restarts epochs: the switch is not undone
    assert learner.stage_name == "joint"

    assert make_learner(backbone, PLOTPP, vision_stage_epochs=0).stage_name == "joint"
    assert PLOTPPConfig().stage_one_epochs(5) == 3
    assert PLOTPPConfig(vision_stage_epochs=7).stage_one_epochs(50) == 7


def test_plotpp_stage_logits(backbone, digit_images):
    images, _ = digit_images
    learner = make_learner(backbone, PLOTPP)
    with torch.no_grad():
        image_features = learner.image_features(images)
        text_features = learner.text_features()
        ot_logits = backbone.logit_scale * transport_scores(image_features, text_features)
        global_logits = learner.cosine_logits(image_features.mean(dim=1), text_features.mean(dim=0))
        torch.testing.assert_close(learner(images), ot_logits + global_logits)
        learner.set_stage("joint")
        torch.testing.assert_close(learner(images), ot_logits)


def test_plotpp_checkpoint_restores_stage(backbone, digit_images, tmp_path):
    images, _ = digit_images
    trained = make_learner(backbone, PLOTPP, seed=1)
    trained.set_stage("joint")
    save_checkpoint(tmp_path / "plotpp.pt", trained)
    fresh = make_learner(backbone, PLOTPP, seed=2)
    assert fresh.stage_name == "vision"
    load_checkpoint(tmp_path / "plotpp.pt", fresh)
    assert fresh.stage_name == "joint"
    assert fresh.ctx.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), trained(images), rtol=0, atol=0)
    shared, local = fresh.split_state()
    assert set(shared) == {"ctx", "visual_ctx"}
    assert set(local) == {"stage"}


def test_plotpp_dataset_templates_build(backbone):
    spec = get_method("plotpp")
    assert "imagenet" not in spec.dataset_config_overrides
    for dataset, phrases in DATASET_CTX_INITS.items():
        config = PLOTPPConfig(**spec.dataset_config_overrides[dataset])
        assert config.ctx_inits == phrases
        learner = PLOTPP(backbone, config)
        learner.set_classnames(ClassSet(DIGITS))
        assert learner.ctx.shape[1] == len(phrases[0].split())
        assert learner.text_features().shape == (4, len(DIGITS), 64)


def test_plotpp_config_validation(backbone):
    with pytest.raises(ValueError, match="ctx_inits has 2 phrases for n_text_prompts=4"):
        PLOTPPConfig(ctx_inits=("a photo of a", "one picture of a"))
    with pytest.raises(ValueError, match="vision_stage_epochs must be >= 0"):
        PLOTPPConfig(vision_stage_epochs=-1)
    with pytest.raises(ValueError, match="fewer than the 4 of the first phrase"):
        PLOTPP(backbone, PLOTPPConfig(ctx_inits=("a photo of a", "a photo", "this is a photo", "one picture of a")))
    random_init = make_learner(backbone, PLOTPP, ctx_inits=None, n_ctx=3, n_text_prompts=2)
    assert random_init.ctx.shape == (2, 3, 64)


def test_plotpp_set_overrides():
    parsed = parse_overrides(
        ["ctx_inits=a photo of a,one picture of a", "n_text_prompts=2", "vision_stage_epochs=10"],
        {"method": PLOTPPConfig, "train": TrainConfig},
    )["method"]
    assert parsed == {"ctx_inits": ("a photo of a", "one picture of a"), "n_text_prompts": 2, "vision_stage_epochs": 10}
    assert PLOTPPConfig(**parsed).stage_one_epochs(50) == 10
    assert parse_overrides(["ctx_inits=none"], {"method": PLOTPPConfig})["method"] == {"ctx_inits": None}
    assert parse_overrides(["vision_stage_epochs=none"], {"method": PLOTPPConfig})["method"] == {"vision_stage_epochs": None}


# ------------------------------------------------------------------------------------------------
# Training loop


class DigitTensors(Dataset):
    def __init__(self, images, labels):
        self.images, self.targets = images, labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


def test_strategy_rebuilds_optimizer_at_stage_switch(backbone, digit_images, tmp_path, caplog):
    from avalanche.core import SupervisedPlugin

    from benchmarks.streams import make_experience
    from strategies.prompt_strategy import PromptStrategy

    images, labels = digit_images
    learner = make_learner(backbone, PLOTPP, vision_stage_epochs=1)

    class Recorder(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.optimized, self.text_ctx = [], []

        def before_training_epoch(self, strategy, *args, **kwargs):
            self.optimized.append([id(p) for group in strategy.optimizer.param_groups for p in group["params"]])
            self.text_ctx.append(strategy.model.ctx.detach().clone())

        def after_training(self, strategy, *args, **kwargs):
            self.text_ctx.append(strategy.model.ctx.detach().clone())

    recorder = Recorder()
    train_config = dataclasses.replace(get_method("plotpp").train_defaults, epochs=2, batch_size=4, warmup_epochs=0)
    strategy = PromptStrategy(learner=learner, train_config=train_config, plugins=[recorder], progress=False, checkpoint_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="strategies.prompt_strategy"):
        strategy.train(make_experience(DigitTensors(images, labels)), num_workers=0)
    assert "trainable parameters changed after epoch 1; optimizer rebuilt over 1536 parameters" in caplog.text

    assert recorder.optimized[0] == [id(learner.visual_ctx)]
    assert sorted(recorder.optimized[1]) == sorted([id(learner.ctx), id(learner.visual_ctx)])
    torch.testing.assert_close(recorder.text_ctx[0], recorder.text_ctx[1], rtol=0, atol=0)
    assert not torch.equal(recorder.text_ctx[1], recorder.text_ctx[2])
    assert [record["epoch"] for record in strategy.history] == [1, 2]
    assert all(math.isfinite(record["ce"]) for record in strategy.history)

    # Resuming restores stage 2, so the saved two-parameter optimizer state loads.
    resumed = make_learner(backbone, PLOTPP, seed=3, vision_stage_epochs=1)
    restarted = PromptStrategy(learner=resumed, train_config=train_config, progress=False)
    assert restarted.restore_training_state(tmp_path / "last.pt") == 2
    assert resumed.stage_name == "joint"
    assert len(restarted.optimizer.param_groups[0]["params"]) == 2
    torch.testing.assert_close(resumed.ctx.detach(), learner.ctx.detach(), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "trainable"), [("plot", 4 * 16 * 64), ("plotpp", 4 * 4 * 64 + 4 * 2 * 64)])
def test_base2novel_cli_run(method, trainable, tmp_path):
    import run_benchmark
    from benchmarks import build_digits

    build_digits(tmp_path / "data")
    status = run_benchmark.main([
        "base2novel", "--method", method, "--dataset", "digits", "--model", "toy-clip",
        "--pretrained", "none", "--epochs", "2", "--shots", "2",
        "--data-root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
        "--output-dir", str(tmp_path / "runs"), "--no-progress", "--set", "batch_size=8",
    ])
    assert status == 0
    results = json.loads((tmp_path / "runs" / "base2novel" / "digits" / method / "seed1" / "results.json").read_text())
    assert results["complete"] is True
    assert results["trainable_params"] == trainable  # PLOT++ ends in stage 2 (both prompt kinds)
    assert [record["epoch"] for record in results["epochs"]] == [1, 2]
    assert math.isfinite(results["loss_terms"]["ce"])
    assert 0.0 <= results["base_accuracy"] <= 100.0
    assert 0.0 <= results["novel_accuracy"] <= 100.0
    assert results["num_base_classes"] == 5
    assert results["num_novel_classes"] == 5

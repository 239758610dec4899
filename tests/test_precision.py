"""Autocast (bf16 on CPU) against fp32: logits within tolerance, fp32 parameters and optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from benchmarks import ImageListDataset, build_digits, build_transform, read_dataset
from benchmarks.streams import make_experience
from learners import ClassSet, TrainConfig, get_method, list_methods, load_backbone
from strategies.prompt_strategy import PromptStrategy

AUTOCAST_COSINE_TOLERANCE = 0.02
"""Largest |cos_bf16 - cos_fp32| accepted: a logit moves by at most this times the logit scale."""


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("toy-clip", "none")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_precision")
    build_digits(root)
    splits = read_dataset("digits", root)
    dataset = ImageListDataset(splits.test[:16], splits.image_root, build_transform(32, train=False))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (B, 3, H, W)
    labels = torch.tensor(dataset.targets)
    return images, labels, ClassSet(splits.classnames, splits.template, "digits")


def build(method, backbone, classes):
    spec = get_method(method)
    torch.manual_seed(1)
    learner = spec.learner_class(backbone, spec.config_class())
    learner.set_classnames(classes)
    return learner


@pytest.mark.parametrize("method", list_methods())
def test_bf16_autocast_logits_within_tolerance(backbone, digits, method):
    images, _, classes = digits
    learner = build(method, backbone, classes)
    learner.eval()
    with torch.no_grad():
        fp32 = learner(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = learner(images).float()
    cosine_error = float((fp32 - bf16).abs().max() / backbone.logit_scale)
    assert cosine_error < AUTOCAST_COSINE_TOLERANCE
    assert cosine_error > 0.0, "autocast did not change the computation"


def train_one(backbone, classes, images, labels, precision):
    learner = build("coop", backbone, classes)
    data = TensorDataset(images, labels)
    data.targets = labels.tolist()
    strategy = PromptStrategy(
        learner=learner,
        train_config=TrainConfig(epochs=2, batch_size=8, lr=0.01, warmup_epochs=0),
        precision=precision,
        progress=False,
    )
    torch.manual_seed(2)
    strategy.train(make_experience(data), num_workers=0)
    return learner, strategy


def test_amp_keeps_fp32_state(backbone, digits):
    images, labels, classes = digits
    reference, _ = train_one(backbone, classes, images, labels, "fp32")
    learner, strategy = train_one(backbone, classes, images, labels, "amp-bf16")

    assert all(p.dtype == torch.float32 for p in learner.parameters())
    momentum = [state["momentum_buffer"] for state in strategy.optimizer.state.values()]
    assert momentum and all(buffer.dtype == torch.float32 for buffer in momentum)
    assert torch.isfinite(learner.ctx).all()
    moved = (reference.ctx - build("coop", backbone, classes).ctx).abs().max()
    drift = (learner.ctx - reference.ctx).abs().max()
    assert drift < 0.1 * moved, "bf16 training diverged from fp32 training"


def test_fp16_autocast_uses_grad_scaler(backbone):
    spec = get_method("coop")
    learner = spec.learner_class(backbone, spec.config_class())
    fp16 = PromptStrategy(learner=learner, train_config=TrainConfig(epochs=1), precision="amp-fp16", progress=False)
    bf16 = PromptStrategy(learner=learner, train_config=TrainConfig(epochs=1), precision="amp-bf16", progress=False)
    assert fp16.scaler.is_enabled()
    assert not bf16.scaler.is_enabled()

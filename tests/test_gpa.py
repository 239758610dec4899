"""Gaussian prompt aggregation plugin: epoch weights, aggregated state, resume, config wiring."""

from __future__ import annotations

import math

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import Dataset

from benchmarks.streams import make_experience
from learners import TrainConfig, build_learner
from learners.coop import CoOpConfig
from learners.promptsrc import PromptSRCConfig
from plugins.gpa import STATE_FILE, GaussianPromptAggregationPlugin, gaussian_epoch_weights, gpa_plugins
from strategies.prompt_strategy import PromptStrategy
from tests.tcp_family_support import BASE, base_batch, toy_backbone


class DigitTensors(Dataset):
    """Normalized digit images with an Avalanche-readable ``targets`` list."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


class StateRecorder(SupervisedPlugin):
    """Stores the learner's learnable state after every epoch, keyed by the 1-based epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def after_training_epoch(self, strategy, *args, **kwargs) -> None:
        self.states[strategy.epoch + 1] = strategy.model.learnable_state_dict()


class SimulatedCrash(RuntimeError):
    """Raised by :class:`StopAfterEpoch`."""


class StopAfterEpoch(SupervisedPlugin):
    """Raises after the given 1-based epoch, before the strategy writes that epoch's checkpoint."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def after_training_epoch(self, strategy, *args, **kwargs) -> None:
        if strategy.epoch + 1 == self.epoch:
            raise SimulatedCrash(f"stopped after epoch {self.epoch}")


def make_learner(method: str):
    torch.manual_seed(0)
    learner = build_learner(method, toy_backbone())
    learner.set_classnames(BASE)
    return learner


def train(learner, plugins, checkpoint_dir=None, resume_from=None):
    config = TrainConfig(epochs=3, batch_size=4, lr=0.05, warmup_epochs=0)
    strategy = PromptStrategy(
        learner=learner, train_config=config, plugins=plugins, checkpoint_dir=checkpoint_dir, progress=False
    )
    if resume_from is not None:
        strategy.restore_training_state(resume_from)
    images, labels = base_batch(8)
    strategy.train(make_experience(DigitTensors(images, labels)), drop_last=True)
    return strategy


def weighted_sum(states: dict[int, dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    keys = states[1].keys()
    return {k: sum(weights[e - 1] * states[e][k].double() for e in states).float() for k in keys}


def test_weights_match_promptsrc_values():
    weights = gaussian_epoch_weights(20, 15.0, 1.0)
    assert len(weights) == 20
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    published = {12: 0.004, 13: 0.054, 14: 0.242, 15: 0.399, 16: 0.242, 17: 0.054, 18: 0.004}
    for epoch, value in published.items():
        assert weights[epoch - 1] == pytest.approx(value, abs=5e-4), f"epoch {epoch}"
    density = [math.exp(-0.5 * (e - 15) ** 2) / math.sqrt(2 * math.pi) for e in range(1, 21)]
    for got, expected in zip(weights, density):
        assert got == pytest.approx(expected / sum(density), rel=1e-9)


def test_weights_with_mean_past_the_end():
    weights = gaussian_epoch_weights(3, 50.0, 1.0)
    assert all(math.isfinite(w) for w in weights)
    assert weights[-1] == pytest.approx(1.0)
    assert gaussian_epoch_weights(1, 15.0, 1.0) == [1.0]


def test_weights_reject_bad_arguments():
    with pytest.raises(ValueError, match="standard deviation must be > 0"):
        gaussian_epoch_weights(5, 2.0, 0.0)
    with pytest.raises(ValueError, match="at least 1 epoch"):
        gaussian_epoch_weights(0, 2.0, 1.0)
    with pytest.raises(ValueError, match="standard deviation must be > 0"):
        GaussianPromptAggregationPlugin(15.0, -1.0)


@pytest.mark.parametrize("method", ("coop", "ivlp"))
def test_aggregate_is_weighted_epoch_sum(method, tmp_path):
    learner = make_learner(method)
    recorder = StateRecorder()
    train(learner, [recorder, GaussianPromptAggregationPlugin(2.0, 1.0)], checkpoint_dir=tmp_path)

    weights = gaussian_epoch_weights(3, 2.0, 1.0)
    expected = weighted_sum(recorder.states, weights)
    final = learner.learnable_state_dict()
    assert sorted(recorder.states) == [1, 2, 3]
    for key, value in expected.items():
        assert torch.allclose(final[key], value, atol=1e-6), key
    assert any(not torch.allclose(final[k], recorder.states[3][k]) for k in final), "aggregate equals the last epoch"
    assert not (tmp_path / STATE_FILE).exists()
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["state_dict"]
    for key, value in final.items():
        assert torch.equal(saved[key], value), f"last.pt holds the unaggregated {key}"


def test_resume_continues_running_sum(tmp_path):
    first = StateRecorder()
    with pytest.raises(SimulatedCrash):
        train(make_learner("ivlp"), [first, GaussianPromptAggregationPlugin(2.0, 1.0), StopAfterEpoch(2)], tmp_path)
    assert (tmp_path / STATE_FILE).exists()

    learner = make_learner("ivlp")
    second = StateRecorder()
    train(learner, [second, GaussianPromptAggregationPlugin(2.0, 1.0)], tmp_path, resume_from=tmp_path / "last.pt")
    assert sorted(second.states) == [2, 3]

    states = {1: first.states[1], 2: second.states[2], 3: second.states[3]}
    expected = weighted_sum(states, gaussian_epoch_weights(3, 2.0, 1.0))
    final = learner.learnable_state_dict()
    for key, value in expected.items():
        assert torch.allclose(final[key], value, atol=1e-6), key


def test_plugins_from_config():
    (plugin,) = gpa_plugins(PromptSRCConfig())
    assert isinstance(plugin, GaussianPromptAggregationPlugin)
    assert (plugin.mean, plugin.std) == (15.0, 1.0)
    assert gpa_plugins(PromptSRCConfig(gpa_mean=None)) == []
    assert gpa_plugins(CoOpConfig()) == []

"""Gaussian prompt aggregation (GPA, from PromptSRC) as an Avalanche plugin for any prompt learner.

After epoch e (1-based) of an experience, the plugin adds ``w_e * state_e`` to a running sum, where
``state_e`` is the learner's learnable state dict and ``w_e`` is proportional to the Gaussian
density N(e; mean, std), normalized over the experience's epochs 1..E. At the end of the
experience the sum replaces the learner's state, so evaluation and the saved checkpoint use the
aggregate. The plugin holds only learnable state, never CLIP's weights.

Hooks::

    before_training_exp   -> epoch weights; the running sum restored when the run resumed
    after_training_epoch  -> sum += w_e * learnable state (and saved beside the checkpoint)
    after_training_exp    -> learner state = sum; the epoch checkpoint rewritten to hold it
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor

logger = logging.getLogger(__name__)

STATE_FILE = "gpa_state.pt"
"""Running sums written beside the strategy's epoch checkpoint, so that ``--resume`` continues them."""


def gaussian_epoch_weights(num_epochs: int, mean: float, std: float) -> list[float]:
    """Weights ``w_e`` of epochs e = 1..E, proportional to N(e; mean, std) and summing to 1.

    The normalization runs on log-densities, so a mean far outside 1..E still yields finite
    weights (concentrated on the epochs nearest the mean) instead of 0/0.

    Raises:
        ValueError: ``num_epochs`` < 1 or ``std`` <= 0.
    """
    if num_epochs < 1:
        raise ValueError(f"Gaussian prompt aggregation needs at least 1 epoch, got {num_epochs!r}")
    if std <= 0:
        raise ValueError(f"the GPA standard deviation must be > 0 epochs, got {std!r}")
    log_density = [-0.5 * ((epoch - mean) / std) ** 2 for epoch in range(1, num_epochs + 1)]
    peak = max(log_density)
    unnormalized = [math.exp(value - peak) for value in log_density]
    total = sum(unnormalized)
    return [value / total for value in unnormalized]


def _weighted(state: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    # Integer entries (counters) cannot be averaged; they keep their latest value.
    return {k: v.double() * weight if v.is_floating_point() else v.clone() for k, v in state.items()}


class GaussianPromptAggregationPlugin(SupervisedPlugin):
    """Replaces a learner's state by the Gaussian-weighted sum of its per-epoch states.

    Works with any learner that provides ``learnable_state_dict()`` and strict
    ``load_learnable_state_dict()``. The sums are kept in float64 and cast back to each entry's
    dtype when loaded.

    Args:
        mean: mean of the weights, in 1-based epochs (PromptSRC: 15 of 20).
        std: standard deviation, in epochs (PromptSRC: 1).
    """

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"the GPA standard deviation must be > 0 epochs, got {std!r}")
        self.mean = float(mean)
        self.std = float(std)
        self.weights: list[float] = []
        self.sum: dict[str, Tensor] | None = None
        self.epochs_summed: list[int] = []
        self._previous: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------
    # Persistence beside the strategy's epoch checkpoint

    @staticmethod
    def _state_path(strategy) -> Path | None:
        directory = getattr(strategy, "checkpoint_dir", None)
        return Path(directory) / STATE_FILE if directory is not None else None

    def _snapshot(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs_summed), "sum": {k: v.cpu() for k, v in (self.sum or {}).items()}}

    def _save(self, strategy) -> None:
        path = self._state_path(strategy)
        if path is None:
            return
        from learners.io import save_torch

        # The strategy writes its checkpoint after this hook: keeping the previous snapshot too
        # lets a resume match whichever epoch that checkpoint reached.
        current = self._snapshot()
        save_torch(path, {"mean": self.mean, "std": self.std, "snapshots": [s for s in (self._previous, current) if s]})
        self._previous = current

    def _restore(self, strategy, finished: int) -> None:
        path = self._state_path(strategy)
        payload = torch.load(path, map_location="cpu", weights_only=True) if path and path.is_file() else None
        if payload is not None and (payload["mean"], payload["std"]) == (self.mean, self.std):
            for snapshot in payload["snapshots"]:
                if snapshot["epochs"] == list(range(1, finished + 1)):
                    self.epochs_summed = list(snapshot["epochs"])
                    device = strategy.device
                    self.sum = {k: v.to(device) for k, v in snapshot["sum"].items()} if snapshot["sum"] else None
                    self._previous = snapshot
                    logger.info("GPA: resumed the running sum of epochs 1..%d from %s", finished, path)
                    return
        logger.warning(
            "GPA: no running sum for the %d epochs finished before the resume (%s); the aggregate covers "
            "only the epochs trained from now on, renormalized",
            finished,
            path,
        )

    # ------------------------------------------------------------------------------------------
    # Hooks

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        total = int(strategy.total_epochs)
        self.weights = gaussian_epoch_weights(total, self.mean, self.std) if total > 0 else []
        self.sum, self.epochs_summed, self._previous = None, [], None
        finished = int(getattr(strategy, "start_epoch", 0))
        if finished > 0:
            self._restore(strategy, finished)
        if total > 0 and not 1 <= self.mean <= total:
            logger.warning(
                "GPA mean %.3g lies outside epochs 1..%d: the aggregate is dominated by the epochs nearest it",
                self.mean,
                total,
            )
        logger.info(
            "GPA over %d epochs (mean %.3g, std %.3g): weights %s",
            total,
            self.mean,
            self.std,
            ", ".join(f"{e}: {w:.3f}" for e, w in enumerate(self.weights, 1) if w >= 5e-4),
        )

    def after_training_epoch(self, strategy, *args, **kwargs) -> None:
        epoch = int(strategy.epoch)  # 0-based
        weight = self.weights[epoch]
        state = strategy.model.learnable_state_dict()
        weighted = _weighted(state, weight)
        if self.sum is None:
            self.sum = weighted
        else:
            self.sum = {k: (self.sum[k] + v) if v.is_floating_point() else v for k, v in weighted.items()}
        self.epochs_summed.append(epoch + 1)
        self._save(strategy)

    def aggregated_state(self, reference: dict[str, Tensor]) -> dict[str, Tensor]:
        """The running sum cast to the dtypes and devices of ``reference`` (a learnable state dict).

        When epochs are missing (a resume without a saved sum), the sum is divided by the weight of
        the epochs it holds, so it stays a weighted mean.
        """
        if self.sum is None:
            raise RuntimeError("GPA has no epoch states to aggregate")
        covered = sum(self.weights[e - 1] for e in self.epochs_summed)
        scale = 1.0 / covered if covered > 0 and not math.isclose(covered, 1.0, rel_tol=1e-9) else 1.0
        return {
            k: ((v * scale) if v.is_floating_point() else v).to(dtype=reference[k].dtype, device=reference[k].device)
            for k, v in self.sum.items()
        }

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        if self.sum is None:
            return
        learner = strategy.model
        learner.load_learnable_state_dict(self.aggregated_state(learner.learnable_state_dict()))
        logger.info("GPA: loaded the Gaussian-weighted state of epochs %s", self.epochs_summed)
        # The last epoch checkpoint holds the unaggregated state; rewrite it so that a resume
        # after training evaluates the aggregate.
        path = self._state_path(strategy)
        if path is not None:
            if hasattr(strategy, "save_training_state"):
                strategy.save_training_state(path.parent / "last.pt")
            path.unlink(missing_ok=True)
        self.sum, self._previous = None, None


def gpa_plugins(method_config: Any) -> list[SupervisedPlugin]:
    """``[GaussianPromptAggregationPlugin]`` when the config sets ``gpa_mean`` (PromptSRC), else ``[]``."""
    mean = getattr(method_config, "gpa_mean", None)
    if mean is None:
        return []
    return [GaussianPromptAggregationPlugin(mean, getattr(method_config, "gpa_std", 1.0))]

"""Upper-bound baseline: a separate prompt for every task, picked by the oracle task identity."""

from __future__ import annotations

import logging

from typing import Any, Sequence

from avalanche.core import SupervisedPlugin
from torch import Tensor

logger = logging.getLogger(__name__)


class SeparatePromptsPlugin(SupervisedPlugin):
    """Trains every task from the initial prompts and evaluates each test set with its own task's.

    Nothing is shared between tasks, so there is no forgetting by construction, and tasks not
    trained yet are evaluated with the initial prompts. With the optimizer rebuilt at every task,
    this is the usual upper bound of prompt-based continual learning. On a class-incremental
    stream it still scores the union of the classes seen so far, but with the prompts of the
    task the test images belong to, which a real class-incremental model does not know.

    The plugin keeps one learnable state dict per task (prompt tensors only).
    """

    def __init__(self) -> None:
        super().__init__()
        self.initial: dict[str, Tensor] | None = None
        self.states: dict[int, dict[str, Tensor]] = {}

    def _remember_initial(self, learner) -> None:
        if self.initial is None:
            self.initial = learner.learnable_state_dict()

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        learner = strategy.model
        self._remember_initial(learner)
        if getattr(strategy, "start_epoch", 0) > 0:
            # Resumed inside this task: the restored prompts and optimizer are this task's.
            return
        learner.load_learnable_state_dict(self.initial)
        # Parameters are loaded in place, so the optimizer would keep the previous task's moments.
        strategy.reset_optimizer()

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        self.states[strategy.experience.current_experience] = strategy.model.learnable_state_dict()

    def before_eval(self, strategy, *args, **kwargs) -> None:
        self._remember_initial(strategy.model)

    def before_eval_exp(self, strategy, *args, **kwargs) -> None:
        task = strategy.experience.current_experience
        strategy.model.load_learnable_state_dict(self.states.get(task, self.initial))

    def state_dict(self) -> dict[int, dict[str, Tensor]]:
        """Return the learned state of every trained task, by task index (a plain dict of tensors)."""
        return {task: {k: v.cpu() for k, v in state.items()} for task, state in self.states.items()}

    def resume_state(self) -> dict[str, Any]:
        """Return the initial prompts and those of every trained task."""
        initial = {k: v.cpu() for k, v in self.initial.items()} if self.initial is not None else None
        return {"initial": initial, "states": self.state_dict()}

    def load_resume_state(self, state: dict[str, Any], strategy, train_stream: Sequence) -> None:
        """Restore the initial prompts and the per-task prompts onto the learner's device."""
        device = strategy.device
        self.initial = {k: v.to(device) for k, v in state["initial"].items()} if state["initial"] is not None else None
        self.states = {int(task): {k: v.to(device) for k, v in s.items()} for task, s in state["states"].items()}

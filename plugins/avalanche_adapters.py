"""Avalanche's LwF, EWC and replay plugins, adapted to prompt learners whose classes change.

A prompt learner scores whatever class set is registered on it, so the number of logits changes
from task to task, and tasks of a multi-dataset stream have overlapping label ids. Avalanche's
plugins assume one fixed output layer. The subclasses here keep Avalanche's logic (the model copy,
the Fisher importances, the replay buffer and its data loader) and change only what depends on
the output space. Every term they add is recorded as a named loss term of ``PromptStrategy``.

Each also implements ``resume_state()`` and ``load_resume_state(state, strategy, train_stream)``,
which the continual runner saves in every checkpoint and restores when a run resumes.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExperienceBalancedBuffer
from avalanche.training.utils import ParamData

from benchmarks.continual import ContinualStream, LabelSpace

from .class_sets import to_class_set

logger = logging.getLogger(__name__)


class PromptLwFPlugin(LwFPlugin):
    """Learning without Forgetting (https://arxiv.org/abs/1606.09282) for prompt learners.

    After each experience the learner is deep-copied into Avalanche's
    ``LearningWithoutForgetting.prev_model``. ``PromptLearner.__deepcopy__`` shares the frozen backbone, so the copy holds only the
    previous prompts and class buffers. During training the copy scores the current images on the
    *current* class set (it rebuilds its own class buffers once per class set), and the loss adds
    ``alpha * KL(softmax(old / T) || softmax(new / T))`` over all current logits as ``lwf``.
    Avalanche's own penalty instead distils the logit columns of the previous task's label ids,
    which are other classes once the class set changes.
    """

    def before_backward(self, strategy, *args, **kwargs) -> None:
        previous = self.lwf.prev_model
        if previous is None:
            return
        learner = strategy.model
        previous.set_classnames(learner.require_classes())
        previous.eval()
        with torch.no_grad():
            teacher = previous(strategy.mb_x).float()
        alpha = self.lwf.alpha[self.lwf.expcount] if isinstance(self.lwf.alpha, (list, tuple)) else self.lwf.alpha
        columns = range(strategy.mb_output.shape[1])
        strategy.add_loss_term("lwf", alpha * self.lwf._distillation_loss(strategy.mb_output, teacher, columns))

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        # Avalanche's post_adapt makes the same copy, then collects the previous classes through
        # ``dataset.task_set``, which the datasets of ``benchmark_from_datasets`` lack in 0.6
        # (AttributeError). The penalty above does not use those classes.
        self.lwf.expcount += 1
        self.lwf.prev_model = copy.deepcopy(strategy.model)

    def resume_state(self) -> dict[str, Any]:
        """Return the experience count and the previous learner's learnable state (None before the first)."""
        previous = self.lwf.prev_model
        return {
            "expcount": self.lwf.expcount,
            "previous": {k: v.cpu() for k, v in previous.learnable_state_dict().items()} if previous is not None else None,
        }

    def load_resume_state(self, state: dict[str, Any], strategy, train_stream: Sequence) -> None:
        """Rebuild the previous learner: a copy of the current one with the saved state loaded."""
        self.lwf.expcount = int(state["expcount"])
        self.lwf.prev_model = None
        if state["previous"] is not None:
            previous = copy.deepcopy(strategy.model)
            previous.load_learnable_state_dict(state["previous"], strict=True)
            self.lwf.prev_model = previous


class PromptEWCPlugin(EWCPlugin):
    """Elastic Weight Consolidation (https://arxiv.org/abs/1612.00796) over the prompt parameters.

    Avalanche's EWC reads ``model.named_parameters()``, which for a prompt learner are the
    learnable prompts only, and computes the Fisher importances with the class set of the
    experience just trained. This subclass only records the penalty as the loss term ``ewc``.
    """

    def before_backward(self, strategy, *args, **kwargs) -> None:
        before = float(strategy.loss.detach())
        super().before_backward(strategy, **kwargs)
        if strategy.clock.train_exp_counter > 0:
            strategy.note_loss_term("ewc", float(strategy.loss.detach()) - before)

    def resume_state(self) -> dict[str, Any]:
        """Return the saved parameters and importances of every past experience, as CPU tensors."""

        def plain(groups) -> dict[int, dict[str, tuple[str, torch.Tensor]]]:
            return {t: {k: (p.name, p.data.cpu()) for k, p in group.items()} for t, group in groups.items()}

        return {"saved_params": plain(self.saved_params), "importances": plain(self.importances)}

    def load_resume_state(self, state: dict[str, Any], strategy, train_stream: Sequence) -> None:
        """Restore the saved parameters and importances onto the strategy's device."""

        def params(groups) -> defaultdict:
            restored: defaultdict = defaultdict(dict)
            for t, group in groups.items():
                restored[int(t)] = {
                    k: ParamData(name, tuple(data.shape), init_tensor=data.to(strategy.device), device=strategy.device)
                    for k, (name, data) in group.items()
                }
            return restored

        self.saved_params = params(state["saved_params"])
        self.importances = params(state["importances"])


class PromptReplayPlugin(ReplayPlugin):
    """Experience replay with Avalanche's buffer and data loader, over a union of label spaces.

    Replayed samples keep the labels of their own task. From the second experience on, the
    learner scores the union of the current task's training classes and those of every task in
    the buffer. The current classes come first, so the current labels stay valid, and
    ``before_forward`` shifts each replayed label by its task's offset in the union. For task-aware streams the cross-entropy of each sample
    is restricted to its own task's columns (the ``ce`` term is replaced), which matches how the
    tasks are evaluated. For class-incremental streams the union is scored as a whole.

    NOTE: the union class set carries the current task's template and dataset name, so learners
    that build hand-crafted features from the template use it for replayed classes too.

    Must come after :class:`~plugins.class_sets.ClassSetPlugin` in the plugin list.

    Args:
        stream: the stream, for the training classes of each task label.
        mem_size / batch_size_mem / task_balanced_dataloader: as Avalanche's ``ReplayPlugin``.
    """

    def __init__(self, stream: ContinualStream, mem_size: int = 200, batch_size_mem: int | None = None,
                 task_balanced_dataloader: bool = False) -> None:
        super().__init__(mem_size=mem_size, batch_size_mem=batch_size_mem,
                         task_balanced_dataloader=task_balanced_dataloader)
        self.stream = stream
        self.offsets: torch.Tensor | None = None  # (num_tasks,), label offset of every task
        self.sizes: torch.Tensor | None = None  # (num_tasks,), classes of every task in the union
        # (experience index, torch RNG state before the buffer update) of every update so far
        self.updates: list[tuple[int, torch.Tensor]] = []

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        self.updates.append((strategy.experience.current_experience, torch.get_rng_state()))
        super().after_training_exp(strategy, *args, **kwargs)

    def resume_state(self) -> dict[str, Any]:
        """Return the experience and RNG state of every buffer update, from which the buffer is rebuilt.

        The buffer contains subsets of the experiences' datasets. Repeating its reservoir updates
        with the same random numbers rebuilds it exactly, without saving any image.
        """
        return {"updates": [(task, rng.clone()) for task, rng in self.updates]}

    def load_resume_state(self, state: dict[str, Any], strategy, train_stream: Sequence) -> None:
        """Rebuild the buffer by repeating the saved updates; the global RNG state is left as it was."""
        outer = torch.get_rng_state()
        self.storage_policy = ExperienceBalancedBuffer(max_size=self.mem_size, adaptive_size=True)
        self.updates = []
        for task, rng in state["updates"]:
            torch.set_rng_state(rng)
            self.storage_policy.post_adapt(strategy, train_stream[task])
            self.updates.append((task, rng))
        torch.set_rng_state(outer)

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        super().before_training_exp(strategy, *args, **kwargs)
        self.offsets = self.sizes = None
        buffer = self.storage_policy.buffer
        if len(buffer) == 0:
            return
        current = strategy.experience.current_experience
        replayed = sorted({int(t) for t in buffer.targets_task_labels} - {current})
        offsets = torch.zeros(len(self.stream), dtype=torch.long)
        sizes = torch.zeros(len(self.stream), dtype=torch.long)
        names: list[str] = []
        for task in [current, *replayed]:
            space = self.stream.tasks[task].train_classes
            offsets[task], sizes[task] = len(names), len(space.classnames)
            names.extend(space.classnames)
        own = self.stream.tasks[current].train_classes
        strategy.model.set_classnames(to_class_set(LabelSpace(tuple(names), own.template, own.dataset)))
        strategy.make_optimizer()  # rebuilt only if the class set changed the trainable parameters
        self.offsets, self.sizes = offsets.to(strategy.device), sizes.to(strategy.device)
        logger.info("replay: task %d trains on %d classes with replayed tasks %s", current, len(names), replayed)

    def before_forward(self, strategy, *args, **kwargs) -> None:
        if self.offsets is None:
            return
        tasks = strategy.mb_task_id
        strategy.mbatch[1] = strategy.mbatch[1] + self.offsets[tasks]

    def before_backward(self, strategy, *args, **kwargs) -> None:
        if self.offsets is None or not self.stream.task_aware:
            return
        logits = strategy.mb_output  # (B, K_union)
        tasks = strategy.mb_task_id
        columns = torch.arange(logits.shape[1], device=logits.device)  # (K_union,)
        start = self.offsets[tasks].unsqueeze(1)  # (B, 1)
        own = (columns >= start) & (columns < start + self.sizes[tasks].unsqueeze(1))  # (B, K_union)
        masked = logits.masked_fill(~own, torch.finfo(logits.dtype).min)
        strategy.replace_loss_term("ce", F.cross_entropy(masked, strategy.mb_y))

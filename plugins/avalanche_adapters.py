"""Avalanche's LwF, EWC and replay plugins, adapted to prompt learners whose classes change.

A prompt learner scores whatever class set is registered on it, so the number of logits changes
from task to task, and tasks of a multi-dataset stream have overlapping label ids. Avalanche's
plugins assume one fixed output layer. The subclasses here keep Avalanche's logic (the model copy,
the Fisher importances, the replay buffer and its data loader) and change only what depends on
the output space. Every term they add is recorded as a named loss term of ``PromptStrategy``.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin

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

"""Keeps the learner's class names in step with a continual stream."""

from __future__ import annotations

import logging

from avalanche.core import SupervisedPlugin

from benchmarks.continual import ContinualStream, LabelSpace
from learners import ClassSet

logger = logging.getLogger(__name__)


def to_class_set(space: LabelSpace) -> ClassSet:
    """Convert a stream's label space to the learner's :class:`~learners.ClassSet`."""
    return ClassSet(space.classnames, space.template, space.dataset)


class ClassSetPlugin(SupervisedPlugin):
    """Registers the classes of every experience on the learner, for training and for evaluation.

    ``before_train_dataset_adaptation`` sets the training classes of the experience. It runs
    before Avalanche builds the optimizer, so a learner whose parameters depend on the class set
    is optimized over the right ones. ``before_eval_exp`` sets the classes that the stream scores
    the evaluated test set on at evaluation point :attr:`point`, which the runner sets before each
    ``strategy.eval`` call. A learner rebuilds its class buffers only when the class set changes.

    Put this plugin before every plugin that reads ``learner.classes`` in the same callback.

    Args:
        stream: the stream whose tasks and evaluation rule give the class sets.
    """

    def __init__(self, stream: ContinualStream) -> None:
        super().__init__()
        self.stream = stream
        self.point = 0

    def before_train_dataset_adaptation(self, strategy, *args, **kwargs) -> None:
        task = strategy.experience.current_experience
        strategy.model.set_classnames(to_class_set(self.stream.tasks[task].train_classes))

    def before_eval_exp(self, strategy, *args, **kwargs) -> None:
        column = strategy.experience.current_experience
        strategy.model.set_classnames(to_class_set(self.stream.eval_classes(self.point, column)))

"""Class-prototype initialization for learners with a prototype classifier (BIP).

A learner does not see the dataset, so a learner that defines
``init_prototypes(features (N, E), labels (N,))`` gets its prototypes from this plugin: one
no-grad pass of the frozen image encoder over the experience's training set before training.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


class PrototypeInitPlugin(SupervisedPlugin):
    """Calls ``learner.init_prototypes`` with the frozen image features of a training experience.

    Experiences whose class set already has prototypes (``learner.prototypes_initialized``) are
    skipped, so resumed runs and repeated class sets keep their trained rows.

    The pass reads ``strategy.experience.dataset`` as it is, so its training transforms
    (random crops and flips) apply, as in BIP's reference, which runs the train loader once.

    Args:
        batch_size: images per forward pass; None uses the strategy's evaluation batch size.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        learner = strategy.model
        if not hasattr(learner, "init_prototypes"):
            return
        if getattr(learner, "prototypes_initialized", False):
            # Already set for this class set: by an earlier pass, or restored from a checkpoint
            # when a run resumes, so the trained rows are kept.
            logger.info("prototype initialization skipped: the current class set already has prototypes")
            return
        dataset = strategy.experience.dataset
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size or strategy.eval_mb_size,
            shuffle=False,
            num_workers=getattr(strategy.train_config, "num_workers", 0),
        )
        features, labels = [], []
        autocast = strategy.autocast() if hasattr(strategy, "autocast") else nullcontext()
        with torch.no_grad(), autocast:
            for batch in loader:
                images, targets = batch[0], batch[1]
                features.append(learner.backbone.encode_image(images.to(strategy.device)).float())
                labels.append(targets)
        if not features:
            logger.warning("prototype initialization skipped: the training experience is empty")
            return
        learner.init_prototypes(torch.cat(features), torch.cat(labels))
        logger.info("initialized %d class prototypes from %d training images", len(learner.classes), len(dataset))


def prototype_plugins(learner) -> list[SupervisedPlugin]:
    """Return ``[PrototypeInitPlugin()]`` for learners that define ``init_prototypes``, else ``[]``."""
    return [PrototypeInitPlugin()] if hasattr(learner, "init_prototypes") else []

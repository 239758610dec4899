"""The one training loop: an Avalanche ``SupervisedTemplate`` that trains a learner's prompts only.

Call tree of one training experience (Avalanche 0.6), with what this strategy adds::

    train(experience)
      before_training_exp          -> optimizer over trainable parameters only (make_optimizer)
      for epoch:
        before_training_epoch      -> EpochLRPlugin sets the Dassl warmup + cosine LR
        for minibatch:
          forward()                -> learner.loss_terms(x, y) under autocast and the text memory
                                      bounds: logits + named terms (loss_terms_features(x, y)
                                      when x contains cached image features)
          criterion()              -> sum of the terms (plugins may add more in before_backward)
          backward()               -> non-finite loss check, GradScaler for amp-fp16
          optimizer_step()
        after_training_epoch       -> learner.on_epoch_end, optimizer rebuilt if the trainable
                                      set changed, term averages, epoch checkpoint
      after_training_exp
"""

from __future__ import annotations

import logging
import math
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from tqdm.auto import tqdm

from learners import PromptLearner, TrainConfig, build_optimizer, lr_at_epoch
from learners.checkpoint import checkpoint_payload
from learners.config import config_to_dict
from learners.io import save_torch

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": None, "amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}


CLOCK_COUNTERS = ("train_iterations", "train_exp_counter", "total_iterations")
"""Avalanche clock counters that carry across experiences (EWC reads ``train_exp_counter``)."""


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN or infinite."""


class EpochLRPlugin(SupervisedPlugin):
    """Sets the learning rate of every parameter group at the start of each epoch."""

    def before_training_epoch(self, strategy: "PromptStrategy", *args, **kwargs) -> None:
        lr = lr_at_epoch(strategy.train_config, strategy.epoch)
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        strategy.current_lr = lr


class ProgressPlugin(SupervisedPlugin):
    """tqdm bars over training and evaluation minibatches (disabled when stderr is no terminal)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = None

    def _open(self, strategy, description: str) -> None:
        total = len(strategy.dataloader) if hasattr(strategy.dataloader, "__len__") else None
        self._bar = tqdm(total=total, desc=description, leave=False, disable=None)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def before_training_epoch(self, strategy, *args, **kwargs) -> None:
        self._open(strategy, f"train epoch {strategy.epoch + 1}/{strategy.total_epochs}")

    def after_training_iteration(self, strategy, *args, **kwargs) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{float(strategy.loss.detach()):.4f}", refresh=False)

    def after_training_epoch(self, strategy, *args, **kwargs) -> None:
        self._close()

    def before_eval_exp(self, strategy, *args, **kwargs) -> None:
        self._open(strategy, "eval")

    def after_eval_iteration(self, strategy, *args, **kwargs) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def after_eval_exp(self, strategy, *args, **kwargs) -> None:
        self._close()


class AccuracyPlugin(SupervisedPlugin):
    """Counts correct top-1 predictions per evaluated experience (exact integers, no averaging)."""

    def __init__(self) -> None:
        super().__init__()
        self.correct = 0
        self.total = 0
        self.per_class_correct: dict[int, int] = {}
        self.per_class_total: dict[int, int] = {}

    def before_eval_exp(self, strategy, *args, **kwargs) -> None:
        self.correct = self.total = 0
        self.per_class_correct, self.per_class_total = {}, {}

    def after_eval_iteration(self, strategy, *args, **kwargs) -> None:
        predictions = strategy.mb_output.argmax(dim=1)
        hits = predictions == strategy.mb_y
        self.correct += int(hits.sum())
        self.total += int(strategy.mb_y.numel())
        for label, hit in zip(strategy.mb_y.tolist(), hits.tolist()):
            self.per_class_total[label] = self.per_class_total.get(label, 0) + 1
            self.per_class_correct[label] = self.per_class_correct.get(label, 0) + int(hit)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy in percent of the last evaluated experience."""
        return 100.0 * self.correct / self.total if self.total else float("nan")


class PromptStrategy(SupervisedTemplate):
    """Trains a :class:`~learners.PromptLearner`'s learnable parameters with the CoOp harness's
    optimizer and schedule, on any Avalanche stream.

    Args:
        learner: the prompt learner (its frozen backbone is not a submodule).
        train_config: optimizer, schedule and batch sizes.
        device: torch device.
        precision: ``fp32``, ``amp-bf16`` or ``amp-fp16``; parameters and optimizer state stay fp32.
        plugins: extra Avalanche plugins (regularizers, metrics); the list is copied.
        evaluator: Avalanche ``EvaluationPlugin``; by default one without loggers.
        checkpoint_dir: where ``last.pt`` (learnable state, optimizer, RNG, epoch) is written after
            every epoch; None disables epoch checkpoints.
        progress: show tqdm bars.
        extra_state: function whose return value :meth:`save_training_state` stores under
            ``extra``, for a runner's own progress (the continual accuracy matrix, plugin state).
    """

    def __init__(
        self,
        *,
        learner: PromptLearner,
        train_config: TrainConfig,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator: EvaluationPlugin | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        progress: bool = True,
        extra_state: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        if precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {list(PRECISION_DTYPES)}, got {precision!r}")
        self.train_config = train_config
        self.precision = precision
        self.accuracy = AccuracyPlugin()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.epoch = 0  # 0-based epoch index within the current experience, resume-aware
        self.start_epoch = 0
        self.total_epochs = train_config.epochs
        self.current_lr = lr_at_epoch(train_config, 0)
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self._terms: dict[str, torch.Tensor] = {}
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        self.extra_state = extra_state
        self._pending_rng: dict[str, Any] | None = None
        self._optimizer_restored = False
        self.inputs_are_features = False  # mb_x contains frozen image features instead of pixels
        # A strategies.feature_cache.FeatureCache that the protocol runners set; None reads pixels.
        self.feature_cache = None
        device = torch.device(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp-fp16")
        all_plugins: list[SupervisedPlugin] = [EpochLRPlugin(), *(plugins or []), self.accuracy]
        if progress:
            all_plugins.append(ProgressPlugin())
        params = learner.trainable_parameters()
        optimizer = build_optimizer(params, train_config) if params else torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        super().__init__(
            model=learner,
            optimizer=optimizer,
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=train_config.batch_size,
            train_epochs=train_config.epochs,
            eval_mb_size=train_config.eval_batch_size,
            device=device,
            plugins=all_plugins,
            evaluator=evaluator if evaluator is not None else EvaluationPlugin(loggers=[]),
            eval_every=-1,
        )

    # ------------------------------------------------------------------------------------------
    # Optimizer: prompt parameters only

    def make_optimizer(self, reset_optimizer_state: bool = False, **kwargs) -> None:
        params = self.model.trainable_parameters()
        current = [p for group in self.optimizer.param_groups for p in group["params"]]
        same = len(current) == len(params) and all(a is b for a, b in zip(current, params))
        if not same or (reset_optimizer_state and self.train_config.reset_optimizer):
            self.optimizer = build_optimizer(params, self.train_config)
        self.optimized_param_id = {id(p): p for p in params}

    def check_model_and_optimizer(self, reset_optimizer_state: bool = False, **kwargs) -> None:
        # Avalanche calls make_optimizer(reset_optimizer_state=False) at every experience
        # boundary, so TrainConfig.reset_optimizer decides here. A state restored by
        # restore_training_state is kept for the experience it was saved in.
        reset = (reset_optimizer_state or self.train_config.reset_optimizer) and not self._optimizer_restored
        self._optimizer_restored = False
        super().check_model_and_optimizer(reset_optimizer_state=reset, **kwargs)

    def reset_optimizer(self) -> None:
        """Rebuild the optimizer over the current trainable parameters, dropping its state."""
        params = self.model.trainable_parameters()
        self.optimizer = build_optimizer(params, self.train_config)
        self.optimized_param_id = {id(p): p for p in params}

    # ------------------------------------------------------------------------------------------
    # Forward, loss, backward

    def autocast(self):
        dtype = PRECISION_DTYPES[self.precision]
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def text_memory(self):
        """Return a context that applies the train config's text-tower bounds (chunk size, checkpointing)."""
        config = self.train_config
        return self.model.backbone.text_memory(chunk_size=config.max_text_chunk, checkpoint=config.text_checkpoint)

    def forward(self):
        # With inputs_are_features, mb_x contains precomputed frozen image features (see
        # strategies.feature_cache), which only learners with uses_frozen_image_features accept.
        with self.autocast(), self.text_memory():
            if self.is_training:
                if self.inputs_are_features:
                    logits, terms = self.model.loss_terms_features(self.mb_x, self.mb_y)
                else:
                    logits, terms = self.model.loss_terms(self.mb_x, self.mb_y)
                self._terms = dict(terms)
            elif self.inputs_are_features:
                logits = self.model.forward_features(self.mb_x)
            else:
                logits = self.model(self.mb_x)
        return logits.float()

    def eval_epoch(self, **kwargs):
        # Parameters and class set are fixed during an evaluation pass: encode class prompts once.
        with self.model.reuse_text_features():
            super().eval_epoch(**kwargs)

    def criterion(self):
        if self.is_training:
            return sum(term.float() for term in self._terms.values())
        return F.cross_entropy(self.mb_output, self.mb_y)

    def add_loss_term(self, name: str, value: torch.Tensor) -> None:
        """Add a named term to the current step's loss (for regularizer plugins in before_backward)."""
        self._terms[name] = value
        self.loss = self.loss + value

    def note_loss_term(self, name: str, value: torch.Tensor | float) -> None:
        """Record a term that a plugin already added to ``self.loss`` (Avalanche's EWC adds in place)."""
        self._terms[name] = torch.as_tensor(value).detach()

    def replace_loss_term(self, name: str, value: torch.Tensor) -> None:
        """Swap a term of the current step's loss for ``value`` (e.g. a masked cross-entropy)."""
        previous = self._terms.get(name)
        self.loss = self.loss + value if previous is None else self.loss - previous + value
        self._terms[name] = value

    def backward(self):
        if not torch.isfinite(self.loss).all():
            terms = ", ".join(f"{k}={float(v.detach()):.6g}" for k, v in self._terms.items())
            last = self.checkpoint_dir / "last.pt" if self.checkpoint_dir is not None else None
            kept = f"; the last good checkpoint is kept at {last}" if last is not None and last.exists() else ""
            raise NonFiniteLossError(
                f"non-finite loss {float(self.loss.detach())} at epoch {self.epoch + 1}, step {self.global_step} "
                f"(terms: {terms}; precision {self.precision}, lr {self.current_lr:.3g}){kept}. "
                + ("Lower the learning rate or check the inputs" if self.precision == "fp32"
                   else "Lower the learning rate, use --precision fp32, or check the inputs")
            )
        self.scaler.scale(self.loss).backward(retain_graph=self.retain_graph)

    def optimizer_step(self):
        if self.train_config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.train_config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # ------------------------------------------------------------------------------------------
    # Epoch bookkeeping, checkpoints and resume

    def _before_training_epoch(self, **kwargs):
        self._apply_pending_rng()
        self.epoch = self.start_epoch + self.clock.train_exp_epochs
        self._term_sums, self._term_count = {}, 0
        super()._before_training_epoch(**kwargs)

    def _after_training_exp(self, **kwargs):
        # A resume after the experience's last epoch trains no epoch: the RNG state saved then
        # still belongs before the end-of-experience hooks (replay sampling, EWC importances).
        self._apply_pending_rng()
        # A resume shortens only the experience it was saved in; later experiences run in full.
        self.start_epoch = 0
        self.train_epochs = self.total_epochs
        super()._after_training_exp(**kwargs)

    def _after_training_iteration(self, **kwargs):
        self.global_step += 1
        self._term_count += 1
        for name, value in self._terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value.detach())
        self._term_sums["loss"] = self._term_sums.get("loss", 0.0) + float(self.loss.detach())
        super()._after_training_iteration(**kwargs)

    def _after_training_epoch(self, **kwargs):
        self.model.on_epoch_end(self.epoch, self.total_epochs)
        # on_epoch_end may change which parameters train (PLOT++ switches stages), and Avalanche
        # calls make_optimizer only at experience boundaries: rebuild now if the set changed.
        previous = self.optimizer
        self.make_optimizer()
        if self.optimizer is not previous:
            logger.info(
                "trainable parameters changed after epoch %d; optimizer rebuilt over %d parameters",
                self.epoch + 1,
                sum(p.numel() for p in self.model.trainable_parameters()),
            )
        record = {"epoch": self.epoch + 1, "lr": self.current_lr}
        record.update({k: v / max(self._term_count, 1) for k, v in self._term_sums.items()})
        self.history.append(record)
        logger.info(
            "epoch %d/%d lr %.4g %s",
            self.epoch + 1,
            self.total_epochs,
            self.current_lr,
            " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "lr")),
        )
        super()._after_training_epoch(**kwargs)
        if self.checkpoint_dir is not None:
            self.save_training_state(self.checkpoint_dir / "last.pt")

    def save_training_state(self, path: str | os.PathLike, finished_epochs: int | None = None) -> None:
        """Write learnable state, optimizer, scaler, RNG states, clock and history atomically.

        Args:
            path: the checkpoint file.
            finished_epochs: epochs of the current experience that are done; by default the epoch
                that just ended. A runner saving between experiences passes 0.
        """
        clock = self.clock
        save_torch(
            path,
            checkpoint_payload(
                self.model,
                epoch=self.epoch + 1 if finished_epochs is None else finished_epochs,
                total_epochs=self.total_epochs,
                train_config=config_to_dict(self.train_config),
                precision=self.precision,
                optimizer=self.optimizer.state_dict(),
                scaler=self.scaler.state_dict(),
                history=self.history,
                global_step=self.global_step,
                clock={name: getattr(clock, name) for name in CLOCK_COUNTERS},
                rng={
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                extra=self.extra_state() if self.extra_state is not None else None,
            ),
        )

    @staticmethod
    def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
        """Read a :meth:`save_training_state` file.

        Raises:
            ValueError: the file is unreadable or contains no training state.
        """
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001
            raise ValueError(
                f"cannot resume from {path}: the file is unreadable ({error}). Delete it and rerun without --resume"
            ) from error
        if not isinstance(payload, dict) or "optimizer" not in payload or "rng" not in payload:
            raise ValueError(
                f"cannot resume from {path}: it is not a training checkpoint (no optimizer or RNG state). "
                "Delete it and rerun without --resume"
            )
        return payload

    def restore_training_state(self, source: str | os.PathLike | dict[str, Any]) -> int:
        """Restore a :meth:`save_training_state` file or its payload; returns the finished epochs.

        The RNG states take effect at the point where they were saved, so the resumed epochs draw
        the same random numbers. A checkpoint written between experiences (0 finished epochs)
        sets them right away. Any other sets them at the start of the next epoch, after the
        experience's setup hooks.

        Raises:
            ValueError: the checkpoint was written with other training settings, another method,
                backbone or method config, or is unreadable.
        """
        from learners.checkpoint import load_checkpoint

        path = source if not isinstance(source, dict) else "the checkpoint"
        payload = source if isinstance(source, dict) else self.read_training_state(source)
        saved = payload.get("train_config", {})
        own = config_to_dict(self.train_config)
        differing = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k))
        if payload.get("precision", self.precision) != self.precision:
            differing.append("precision")
        if differing:
            details = ", ".join(
                f"{k} (checkpoint {payload.get('precision') if k == 'precision' else saved.get(k)!r}, "
                f"now {self.precision if k == 'precision' else own.get(k)!r})"
                for k in differing
            )
            raise ValueError(
                f"cannot resume from {path}: it was saved by a run with other training settings: {details}. "
                "Resume with the same options, or rerun without --resume to start over"
            )
        load_checkpoint(payload, self.model)
        self.make_optimizer()
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.history = list(payload["history"])
        self.global_step = int(payload["global_step"])
        for name, value in payload.get("clock", {}).items():
            setattr(self.clock, name, value)
        finished = int(payload["epoch"])
        # Mid-experience, the restored optimizer state belongs to the experience being resumed;
        # between experiences TrainConfig.reset_optimizer decides as in an uninterrupted run.
        self._optimizer_restored = finished > 0
        self._pending_rng = payload["rng"]
        if finished == 0:
            self._apply_pending_rng()
        self.start_epoch = finished
        self.train_epochs = max(self.total_epochs - finished, 0)
        logger.info("resumed from %s after epoch %d/%d", path, finished, self.total_epochs)
        return finished

    def _apply_pending_rng(self) -> None:
        rng, self._pending_rng = self._pending_rng, None
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def epoch_history(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.history]


def mean_terms(history: list[dict[str, Any]]) -> dict[str, float]:
    """Loss terms of the last epoch (what each term contributed at the end of training)."""
    if not history:
        return {}
    return {k: float(v) for k, v in history[-1].items() if k not in ("epoch", "lr") and math.isfinite(float(v))}

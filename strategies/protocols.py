"""Few-shot, cross-dataset and domain-generalization runs, from settings to ``results.json``.

- Few-shot: train on K images of every class, evaluate on the full test split.
- Cross-dataset: train once on a source dataset (ImageNet, all classes, 16 shots), then evaluate
  the same learned state on each target with the target's class names and template.
- Domain generalization: the same with the four ImageNet variants as targets. ImageNet-A and -R
  hold 200 of the 1000 classes, and their readers return exactly those class names with labels
  0..199, so the learner scores each image over the 200 names only.

Each run writes ``results.json`` atomically with ``complete: true`` last of all, so a sweep can
skip finished runs; :func:`results_complete` also checks that a transfer run covered the
requested targets.

Each protocol trains with the method's published config for it where the reference releases
one (``MethodSpec.protocol_overrides``: MaPLe's, PromptSRC's and BIP's cross-dataset settings,
PromptSRC's few-shot settings), else with the base-to-novel config.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import STANDARD_DATASETS, DatasetSplits, ImageListDataset, build_transform, fewshot_splits, read_dataset
from benchmarks.protocols import base2novel_splits
from learners import ClassSet, PromptLearner, TrainConfig, get_method
from learners.checkpoint import save_checkpoint
from learners.config import config_to_dict
from learners.io import write_json

from .experiment import (
    RESULTS_SCHEMA,
    RunSettings,
    evaluate,
    feature_cache,
    get_backbone,
    harmonic_mean,
    peak_memory,
    resolve_configs,
    run_config_record,
    run_dir,
    seed_everything,
    training_plugins,
)
from .feature_cache import train_experience
from .prompt_strategy import PromptStrategy

logger = logging.getLogger(__name__)

BASE2NOVEL = "base2novel"
FEWSHOT = "fewshot"
CROSS_DATASET = "cross-dataset"
DOMAIN_GENERALIZATION = "domain-generalization"
TRANSFER_SOURCE = "imagenet"
DOMAIN_GENERALIZATION_TARGETS: tuple[str, ...] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def default_targets(protocol: str, source: str) -> tuple[str, ...]:
    """Return the targets a transfer protocol evaluates when none are given.

    Cross-dataset: the 11 standard datasets except the source. Domain generalization: the four
    ImageNet variants.
    """
    if protocol == CROSS_DATASET:
        return tuple(name for name in STANDARD_DATASETS if name != source)
    if protocol == DOMAIN_GENERALIZATION:
        return DOMAIN_GENERALIZATION_TARGETS
    raise ValueError(f"protocol {protocol!r} has no targets; use {CROSS_DATASET!r} or {DOMAIN_GENERALIZATION!r}")


def results_complete(path: Path, targets: Sequence[str] | None = None) -> bool:
    """Return whether ``path`` contains complete results (and, if given, an accuracy per target).

    A run whose file lacks a requested target is incomplete, so that widening ``--targets``
    reruns it instead of silently leaving the new targets out of the summary.
    """
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(results, dict) or not results.get("complete"):
        return False
    if targets is None:
        return True
    evaluated = results.get("targets")
    return isinstance(evaluated, dict) and all(target in evaluated for target in targets)


# ---------------------------------------------------------------------------------------------
# Shared steps: train on one split list, evaluate on the test split of another


@dataclass
class TrainedLearner:
    """A learner after training, with what its results need."""

    learner: PromptLearner
    strategy: PromptStrategy
    classes: ClassSet
    method_config: Any
    train_config: TrainConfig
    train_set: ImageListDataset
    train_seconds: float


def read_fewshot(settings: RunSettings, dataset: str) -> DatasetSplits:
    """Read ``dataset`` and sample ``settings.shots`` train images per class (all for None)."""
    splits = read_dataset(dataset, settings.resolved_data_root())
    return fewshot_splits(splits, settings.shots, settings.seed, settings.resolved_cache_dir() / "fewshot")


def class_set(splits: DatasetSplits) -> ClassSet:
    """Return the class set of ``splits``: class names in label order, template and dataset name."""
    return ClassSet(splits.classnames, splits.template, splits.name)


def train_learner(settings: RunSettings, splits: DatasetSplits, out: Path, shots: int | None = None,
                  protocol: str | None = None) -> TrainedLearner:
    """Build the method's learner and train it on the train list of ``splits``.

    Args:
        settings: The run; ``settings.method`` and ``settings.seed`` are used.
        splits: Few-shot splits whose train list and class names the learner trains on.
        out: Run folder for the epoch checkpoint ``last.pt``; with ``settings.resume`` training
            continues from it.
        shots: Shot count that selects the method's few-shot epoch schedule, or None.
        protocol: ``base2novel``, ``fewshot`` or ``transfer``, whose published method settings apply.

    Returns:
        The trained learner with its class set still set to the training classes.
    """
    spec = get_method(settings.method)
    method_config, train_config = resolve_configs(settings, splits.name, shots, protocol)
    backbone = get_backbone(settings)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    seed_everything(settings.seed)
    learner = spec.learner_class(backbone, method_config).to(settings.device)
    classes = class_set(splits)
    learner.set_classnames(classes)
    train_set = ImageListDataset(
        splits.train, splits.image_root, build_transform(backbone.image_size, train=True, dataset=splits.name), on_error=settings.on_bad_image
    )
    strategy = PromptStrategy(
        learner=learner,
        train_config=train_config,
        device=settings.device,
        precision=settings.precision,
        checkpoint_dir=out,
        progress=settings.progress,
        plugins=training_plugins(learner, method_config),
    )
    strategy.feature_cache = feature_cache(settings, train_config, backbone)
    last = out / "last.pt"
    if settings.resume and last.is_file():
        strategy.restore_training_state(last)
    elif last.is_file():
        logger.warning("%s is the epoch checkpoint of an interrupted run; starting over (pass --resume to continue it)", last)
        last.unlink()

    train_seconds = 0.0
    if train_config.epochs > 0 and learner.num_trainable_parameters() > 0 and strategy.train_epochs > 0:
        start = time.perf_counter()
        train_experience(
            strategy, train_set, settings.seed, num_workers=train_config.num_workers, drop_last=len(train_set) >= train_config.batch_size
        )
        train_seconds = time.perf_counter() - start
    return TrainedLearner(learner, strategy, classes, method_config, train_config, train_set, train_seconds)


def evaluate_split(trained: TrainedLearner, splits: DatasetSplits, settings: RunSettings) -> dict[str, Any]:
    """Evaluate the trained learner on the test list of ``splits``, scored over its classes.

    Returns:
        ``accuracy`` (percent), ``correct``, ``total``, ``seconds``, ``images_per_second``,
        ``num_classes`` and ``skipped_images`` (the unreadable image paths).
    """
    if not splits.test:
        raise ValueError(f"dataset {splits.name!r} has no test images to evaluate")
    dataset = ImageListDataset(
        splits.test, splits.image_root, build_transform(trained.learner.backbone.image_size, train=False), on_error=settings.on_bad_image
    )
    metrics = evaluate(trained.strategy, trained.learner, class_set(splits), dataset)
    metrics["num_classes"] = splits.num_classes
    metrics["skipped_images"] = sorted(dataset.skipped)
    return metrics


# ---------------------------------------------------------------------------------------------
# results.json pieces shared by the protocols


def _header(settings: RunSettings, protocol: str) -> dict[str, Any]:
    return {
        "schema": RESULTS_SCHEMA,
        "complete": True,
        "protocol": protocol,
        "method": settings.method,
        "dataset": settings.dataset,
        "seed": settings.seed,
        "shots": settings.shots,
        "model": settings.model,
        "pretrained": settings.pretrained,
        "precision": settings.precision,
    }


def _cost(trained: TrainedLearner, evaluations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    history = trained.strategy.epoch_history()
    epochs_timed = len(history) - trained.strategy.start_epoch
    eval_seconds = sum(e["seconds"] for e in evaluations)
    eval_images = sum(e["total"] for e in evaluations)
    memory, memory_kind = peak_memory()
    skipped = sorted({path for e in evaluations for path in e["skipped_images"]} | set(trained.train_set.skipped))
    return {
        "num_train_images": len(trained.train_set),
        "trainable_params": trained.learner.num_trainable_parameters(),
        "train_seconds": trained.train_seconds,
        # Only the epochs run in this process were timed: a resumed run restores the others.
        "train_seconds_per_epoch": trained.train_seconds / epochs_timed if epochs_timed > 0 else None,
        "epochs_resumed": trained.strategy.start_epoch,
        "eval_seconds": eval_seconds,
        "eval_images_per_second": eval_images / max(eval_seconds, 1e-9),
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "skipped_images": len(skipped),
        "skipped_image_paths": skipped[:100],
        "loss_terms": history[-1] if history else {},
        "epochs": history,
    }


def _config(settings: RunSettings, trained: TrainedLearner) -> dict[str, Any]:
    return {
        "config": {
            "method": config_to_dict(trained.method_config),
            "train": config_to_dict(trained.train_config),
            "run": run_config_record(settings),
        },
        "torch_version": torch.__version__,
    }


def _finish(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    write_json(out / "results.json", results)
    last = out / "last.pt"
    if last.is_file():
        last.unlink()
    return results


# ---------------------------------------------------------------------------------------------
# Protocols


def run_base2novel(settings: RunSettings) -> dict[str, Any]:
    """Train on the base classes and evaluate base and novel, each over its own class names.

    Returns:
        The results written to ``OUTPUT/base2novel/DATASET/METHOD/seedS/results.json``.
    """
    out = run_dir(settings, BASE2NOVEL)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    base, novel = base2novel_splits(
        settings.dataset, settings.resolved_data_root(), settings.shots, settings.seed, settings.resolved_cache_dir() / "fewshot"
    )
    trained = train_learner(settings, base, out, protocol="base2novel")
    base_eval = evaluate_split(trained, base, settings)
    novel_eval = evaluate_split(trained, novel, settings)
    trained.learner.set_classnames(trained.classes)
    save_checkpoint(out / "model.pt", trained.learner, dataset=settings.dataset, seed=settings.seed)

    results = _header(settings, BASE2NOVEL)
    results.update(
        base_accuracy=base_eval["accuracy"],
        novel_accuracy=novel_eval["accuracy"],
        harmonic_mean=harmonic_mean(base_eval["accuracy"], novel_eval["accuracy"]),
        num_base_classes=base_eval["num_classes"],
        num_novel_classes=novel_eval["num_classes"],
        num_base_test_images=base_eval["total"],
        num_novel_test_images=novel_eval["total"],
    )
    results.update(_cost(trained, [base_eval, novel_eval]))
    results.update(_config(settings, trained))
    logger.info("%s %s seed %d: base %.2f novel %.2f HM %.2f -> %s", settings.method, settings.dataset, settings.seed,
                results["base_accuracy"], results["novel_accuracy"], results["harmonic_mean"], out / "results.json")
    return _finish(out, results)


def run_fewshot(settings: RunSettings) -> dict[str, Any]:
    """Train on ``settings.shots`` images of every class and evaluate on the full test split.

    The epochs follow the method's few-shot schedule for that shot count when it has one
    (CoOp: 50 epochs for 1 shot, 100 for 2 and 4, 200 for 8 and 16; ImageNet always 50).

    Returns:
        The results written to ``OUTPUT/fewshot/DATASET/METHOD/shotsK/seedS/results.json``.
    """
    out = run_dir(settings, FEWSHOT)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    splits = read_fewshot(settings, settings.dataset)
    trained = train_learner(settings, splits, out, shots=settings.shots, protocol="fewshot")
    test = evaluate_split(trained, splits, settings)
    save_checkpoint(out / "model.pt", trained.learner, dataset=settings.dataset, seed=settings.seed)

    results = _header(settings, FEWSHOT)
    results.update(
        accuracy=test["accuracy"],
        correct=test["correct"],
        num_classes=test["num_classes"],
        num_test_images=test["total"],
    )
    results.update(_cost(trained, [test]))
    results.update(_config(settings, trained))
    logger.info("%s %s %s-shot seed %d: accuracy %.2f -> %s", settings.method, settings.dataset,
                settings.shots if settings.shots is not None else "all", settings.seed, test["accuracy"], out / "results.json")
    return _finish(out, results)


def run_transfer(settings: RunSettings, protocol: str, targets: Sequence[str] | None = None) -> dict[str, Any]:
    """Train on ``settings.dataset`` (all classes), then evaluate on it and on every target.

    The learned state is the same for every target; only the class set changes, to the target's
    class names and template.

    Args:
        settings: The run; ``settings.dataset`` is the source dataset.
        protocol: :data:`CROSS_DATASET` or :data:`DOMAIN_GENERALIZATION`.
        targets: Target dataset names; None uses :func:`default_targets`.

    Returns:
        The results written to ``OUTPUT/PROTOCOL/SOURCE/METHOD/seedS/results.json``: source
        accuracy, an entry per target and the mean target accuracy.
    """
    targets = tuple(targets) if targets is not None else default_targets(protocol, settings.dataset)
    if not targets:
        raise ValueError(f"{protocol} needs at least one target dataset")
    out = run_dir(settings, protocol)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(settings.seed)
    # Read every target before training, so that a missing dataset fails in seconds.
    target_splits = {name: read_dataset(name, settings.resolved_data_root()) for name in targets}
    source = read_fewshot(settings, settings.dataset)
    trained = train_learner(settings, source, out, protocol="transfer")
    save_checkpoint(out / "model.pt", trained.learner, dataset=settings.dataset, seed=settings.seed)

    source_eval = evaluate_split(trained, source, settings)
    evaluations = {}
    for name, splits in target_splits.items():
        evaluations[name] = evaluate_split(trained, splits, settings)
        logger.info("%s trained on %s, evaluated on %s: accuracy %.2f (%d classes)", settings.method,
                    settings.dataset, name, evaluations[name]["accuracy"], splits.num_classes)
    trained.learner.set_classnames(trained.classes)

    results = _header(settings, protocol)
    results.update(
        source=settings.dataset,
        source_accuracy=source_eval["accuracy"],
        source_num_classes=source_eval["num_classes"],
        source_num_test_images=source_eval["total"],
        targets={
            name: {
                "accuracy": e["accuracy"],
                "correct": e["correct"],
                "num_classes": e["num_classes"],
                "num_test_images": e["total"],
                "eval_images_per_second": e["images_per_second"],
            }
            for name, e in evaluations.items()
        },
        target_accuracies={name: e["accuracy"] for name, e in evaluations.items()},
        average_target_accuracy=statistics.fmean(e["accuracy"] for e in evaluations.values()),
    )
    results.update(_cost(trained, [source_eval, *evaluations.values()]))
    results.update(_config(settings, trained))
    logger.info("%s %s seed %d: source %.2f, mean over %d targets %.2f -> %s", settings.method, protocol, settings.seed,
                results["source_accuracy"], len(targets), results["average_target_accuracy"], out / "results.json")
    return _finish(out, results)


def run_cross_dataset(settings: RunSettings, targets: Sequence[str] | None = None) -> dict[str, Any]:
    """Cross-dataset transfer: :func:`run_transfer` with the other standard datasets as targets."""
    return run_transfer(settings, CROSS_DATASET, targets)


def run_domain_generalization(settings: RunSettings, targets: Sequence[str] | None = None) -> dict[str, Any]:
    """Domain generalization: :func:`run_transfer` with ImageNet-V2, -Sketch, -A and -R as targets."""
    return run_transfer(settings, DOMAIN_GENERALIZATION, targets)

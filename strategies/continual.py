"""The continual protocol: train one learner on a stream of tasks and fill its accuracy matrix.

Flow of one run::

    build the stream (benchmarks.continual) and its Avalanche benchmark
    evaluate every task before training                -> zero-shot row of the matrix
    for each task:
        strategy.train(experience)                     -> ClassSetPlugin sets the task's classes;
                                                          regularizer/LwF/EWC/replay plugins act
        evaluate the stream's test sets for this point -> one row; ClassSetPlugin sets the classes
                                                          of every evaluated test set
        checkpoint (plain state dict), partial results.json and last.pt
    metrics from the matrix, heatmap PNG, results.json

``last.pt`` is also written after every epoch; ``--resume`` continues from it (see
:func:`run_continual`).

The metrics are computed from per-task accuracies by ``plugins.continual_metrics`` and logged
through Avalanche's ``EvaluationPlugin`` to a text log, CSV files and TensorBoard.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from avalanche.logging import CSVLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from benchmarks.continual import ContinualStream, StreamSpec
from benchmarks.continual_report import plot_accuracy_matrix
from learners import get_method
from learners.checkpoint import save_checkpoint
from learners.config import config_to_dict
from learners.io import save_torch, write_json
from plugins.class_sets import ClassSetPlugin, to_class_set
from plugins.continual_metrics import ContinualAccuracyMatrix, summarize_matrix
from plugins.registry import PLUGINS, PluginContext, build_plugins, parse_plugin_overrides, plugin_names
from plugins.separate_prompts import SeparatePromptsPlugin

from .experiment import (
    RESULTS_SCHEMA,
    RunSettings,
    feature_cache,
    get_backbone,
    peak_memory,
    resolve_configs,
    run_config_record,
    run_dir,
    section_differences,
    seed_everything,
    stored_config_differences,
    training_plugins,
)
from .feature_cache import FeatureDataset
from .prompt_strategy import PromptStrategy

logger = logging.getLogger(__name__)

PROTOCOL = "continual"
RESUME_FILE = "last.pt"


@dataclass(frozen=True)
class ContinualSettings:
    """One continual run: the shared run settings, the stream and the plugins.

    ``run.dataset`` is unused; the stream names the data. The properties give ``run_sweep`` and
    ``run_dir`` the folder ``OUTPUT/continual/<stream label>/<method>[+plugins]/seed<S>``.

    Attributes:
        plugin_overrides: ``--set`` values per plugin name.
    """

    run: RunSettings
    stream: StreamSpec
    plugins: tuple[str, ...] = ()
    plugin_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """Method label with its plugins, e.g. ``coop+ewc``."""
        return "+".join((self.run.method, *self.plugins))

    @property
    def dataset(self) -> str:
        """Stream label, e.g. ``mtil-order1-full``."""
        return self.stream.label(self.run.shots)

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def shots(self) -> int | None:
        return self.run.shots

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def stored_differences(self, results: Mapping[str, Any]) -> list[str]:
        """List what this run would use that a finished run's ``results.json`` did not: the run fields,
        the resolved method and train configs, the plugins' configs and the stream's settings."""
        stored = results.get("config", {}) if isinstance(results.get("config"), dict) else {}
        differences = stored_config_differences(self.run, results, dataset="")
        stored_plugins = stored.get("plugins", {})
        if isinstance(stored_plugins, dict) and sorted(stored_plugins) != sorted(self.plugins):
            differences.append(f"plugins: stored {sorted(stored_plugins)!r}, requested {sorted(self.plugins)!r}")
        else:
            for name in self.plugins:
                config = PLUGINS[name].config_class(**dict(self.plugin_overrides.get(name, {})))
                differences += section_differences(name, stored_plugins.get(name), config_to_dict(config))
        differences += section_differences("stream", stored.get("stream"), config_to_dict(self.stream))
        return differences


def _finite(value: Any) -> Any:
    """NaN -> None, recursively, so results.json stays strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _row_labels(stream: ContinualStream, rows: int) -> list[str]:
    return ["zero-shot"] + [f"after {i + 1}: {stream.tasks[i].name}" for i in range(rows - 1)]


class _Loggers:
    """Avalanche's text, CSV and TensorBoard loggers writing into the run folder.

    A resumed run appends to ``log.txt`` and writes its CSV files to ``csv-resumedN``, since
    Avalanche's CSV logger truncates its files when it opens them.
    """

    def __init__(self, out: Path, resumed: bool) -> None:
        csv_dir = out / "csv"
        if resumed:
            count = 1
            while (out / f"csv-resumed{count}").exists():
                count += 1
            csv_dir = out / f"csv-resumed{count}"
        self.text_file = open(out / "log.txt", "a" if resumed else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.loggers = [TextLogger(self.text_file), CSVLogger(str(csv_dir)), TensorboardLogger(str(out / "tensorboard"))]

    def close(self) -> None:
        for avalanche_logger in self.loggers:
            # CSVLogger has close(); TensorboardLogger only closes its writer at exit.
            closable = getattr(avalanche_logger, "writer", avalanche_logger)
            if callable(getattr(closable, "close", None)):
                closable.close()
        self.text_file.close()


def _resumable(plugins: list) -> dict[str, Any]:
    """Plugins with state to save, keyed by position and class name (``2:PromptEWCPlugin``)."""
    return {f"{i}:{type(p).__name__}": p for i, p in enumerate(plugins) if hasattr(p, "resume_state")}


def run_continual(settings: ContinualSettings) -> dict[str, Any]:
    """Train ``settings.run.method`` on the stream with the plugins, writing ``results.json``.

    After every epoch and after every task's evaluation ``last.pt`` in the run folder contains
    everything a resume needs: the learnable state, optimizer, RNG states, the accuracy matrix
    so far and the plugins' state (LwF's previous prompts, EWC's importances, the replay buffer's
    updates, the per-task prompts; GPA keeps its running sum in ``gpa_state.pt``). With
    ``settings.run.resume`` a run continues from it and ends as an uninterrupted run would;
    without, an existing ``last.pt`` is deleted and the run starts over.
    """
    run = settings.run
    out = run_dir(settings, PROTOCOL)
    out.mkdir(parents=True, exist_ok=True)
    last = out / RESUME_FILE
    saved = None
    if last.is_file() and run.resume:
        saved = PromptStrategy.read_training_state(last)
    elif last.is_file():
        logger.warning("%s is the checkpoint of an interrupted run; starting over (pass --resume to continue it)", last)
        last.unlink()
    seed_everything(run.seed)
    spec = get_method(run.method)
    # NOTE: one method and train config serves every task, so per-dataset overrides (CoOp's 50
    # ImageNet epochs, CoPrompt's per-dataset table) are not applied in continual runs.
    method_config, train_config = resolve_configs(run, "", run.shots)
    stream = settings.stream.build(
        run.resolved_data_root(), shots=run.shots, seed=run.seed, cache_dir=run.resolved_cache_dir() / "fewshot"
    )
    backbone = get_backbone(run)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    seed_everything(run.seed)
    learner = spec.learner_class(backbone, method_config).to(run.device)
    learner.set_classnames(to_class_set(stream.tasks[0].train_classes))
    benchmark = stream.build_benchmark(backbone.image_size, run.on_bad_image)
    own_plugins = training_plugins(learner, method_config)
    if "gpa" in settings.plugins and any(type(p).__name__ == "GaussianPromptAggregationPlugin" for p in own_plugins):
        raise ValueError(f"{run.method} already aggregates its prompts with GPA (gpa_mean); drop 'gpa' from --plugins")
    extra_plugins, plugin_configs = build_plugins(
        settings.plugins, PluginContext(stream, train_config.epochs), settings.plugin_overrides
    )
    loggers = _Loggers(out, resumed=saved is not None)
    try:
        runner = _ContinualRun(settings, stream, benchmark, learner, out, method_config, train_config, plugin_configs,
                               own_plugins, extra_plugins, loggers)
        if saved is not None:
            runner.restore(saved, last)
        results = runner.run()
    finally:
        loggers.close()
    return results


class _ContinualRun:
    """One continual run's strategy and progress: the tasks done, the matrix, the epoch records."""

    def __init__(self, settings: ContinualSettings, stream: ContinualStream, benchmark, learner, out: Path,
                 method_config, train_config, plugin_configs, own_plugins, extra_plugins, loggers: _Loggers) -> None:
        run = settings.run
        self.settings, self.stream, self.benchmark, self.learner, self.out = settings, stream, benchmark, learner, out
        self.method_config, self.train_config, self.plugin_configs = method_config, train_config, plugin_configs
        self.extra_plugins = extra_plugins
        self.class_plugin = ClassSetPlugin(stream)
        self.metric = ContinualAccuracyMatrix(len(stream), stream.task_aware)
        self.tasks_done = 0
        self.task_history: list[list[dict[str, Any]]] = []
        self.timing: dict[str, float] = {"train_seconds": 0.0, "eval_seconds": 0.0, "eval_images": 0, "epochs": 0}
        self.resumed_from: dict[str, int] | None = None
        self.cache = feature_cache(run, train_config, learner.backbone)
        self.identity = {
            "method_label": settings.method,
            "stream": config_to_dict(settings.stream),
            "plugins": {name: config_to_dict(config) for name, config in plugin_configs.items()},
            "stream_label": stream.label,
        }
        self.strategy = PromptStrategy(
            learner=learner,
            train_config=train_config,
            device=run.device,
            precision=run.precision,
            plugins=[self.class_plugin, *own_plugins, *extra_plugins],
            evaluator=EvaluationPlugin(self.metric, loggers=loggers.loggers),
            checkpoint_dir=out,
            progress=run.progress,
            extra_state=self.state,
        )

    # -- checkpoint state -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Return the runner's part of ``last.pt``: what identifies the run and how far it got."""
        return {
            "continual": {
                "identity": self.identity,
                "tasks_done": self.tasks_done,
                "correct": [list(row) for row in self.metric.correct],
                "total": [list(row) for row in self.metric.total],
                "task_history": self.task_history,
                "timing": dict(self.timing),
                "plugins": {key: plugin.resume_state() for key, plugin in _resumable(self.extra_plugins).items()},
            }
        }

    def restore(self, payload: dict[str, Any], path: Path) -> None:
        """Continue from ``last.pt``: plugins first, then the strategy (whose RNG states come last).

        Raises:
            ValueError: the checkpoint belongs to another stream, method, plugin set or settings.
        """
        saved = (payload.get("extra") or {}).get("continual")
        if saved is None:
            raise ValueError(f"cannot resume from {path}: it is not a continual checkpoint. "
                             "Rerun without --resume to start over")
        differing = sorted(k for k in self.identity if saved["identity"].get(k) != self.identity[k])
        if differing:
            details = ", ".join(f"{k} (checkpoint {saved['identity'].get(k)!r}, now {self.identity[k]!r})" for k in differing)
            raise ValueError(f"cannot resume from {path}: it was saved by a run with other continual settings: {details}. "
                             "Resume with the same options, or rerun without --resume to start over")
        plugins = _resumable(self.extra_plugins)
        if set(plugins) != set(saved["plugins"]):
            raise ValueError(f"cannot resume from {path}: its plugin state {sorted(saved['plugins'])} does not match "
                             f"the plugins of this run {sorted(plugins)}. Rerun without --resume to start over")
        train_stream = self.benchmark.scenario.train_stream
        for key, plugin in plugins.items():
            plugin.load_resume_state(saved["plugins"][key], self.strategy, train_stream)
        self.metric.correct = [list(row) for row in saved["correct"]]
        self.metric.total = [list(row) for row in saved["total"]]
        self.tasks_done = int(saved["tasks_done"])
        self.task_history = [list(records) for records in saved["task_history"]]
        self.timing = dict(saved["timing"])
        epochs = self.strategy.restore_training_state(payload)
        self.resumed_from = {"tasks_done": self.tasks_done, "epochs_done": epochs}
        logger.info("resuming %s on %s: %d of %d tasks done, %d epochs of the next", self.settings.method,
                    self.stream.label, self.tasks_done, len(self.stream), epochs)

    # -- the run --------------------------------------------------------------------------------

    @functools.cached_property
    def feature_test_stream(self) -> Any:
        """The test stream with every image replaced by its cached frozen feature, or None.

        A learner without prompts in its image tower gets the same image features at every
        evaluation point, so each test set is encoded once, not once per row of the matrix, and
        later runs read it from the cache folder. None when the cache is off, does not apply to
        the learner or would exceed its size limit. Evaluation then reads the images.
        """
        cache, learner, test_sets = self.cache, self.learner, self.benchmark.test_sets
        usable = (cache is not None and cache.applies_to(learner) and all(len(d) > 0 for d in test_sets)
                  and all(cache.fits(learner, d) for d in test_sets))
        if not usable:
            return None
        from avalanche.benchmarks import benchmark_from_datasets, task_incremental_benchmark
        from avalanche.benchmarks.utils import as_classification_dataset

        datasets = [as_classification_dataset(FeatureDataset(*cache.features(learner, d))) for d in test_sets]
        # Avalanche requires a train stream; only the test stream is read.
        scenario = benchmark_from_datasets(train=datasets, test=datasets)
        return task_incremental_benchmark(scenario).test_stream

    def evaluate(self, point: int) -> None:
        self.class_plugin.point = self.metric.point = point
        columns = self.stream.eval_columns(point)
        start = time.perf_counter()
        features = self.feature_test_stream
        strategy = self.strategy
        if features is not None:
            strategy.inputs_are_features = True
            try:
                strategy.eval([features[j] for j in columns], num_workers=0)
            finally:
                strategy.inputs_are_features = False
        else:
            strategy.eval([self.benchmark.scenario.test_stream[j] for j in columns], num_workers=self.train_config.num_workers)
        self.timing["eval_seconds"] += time.perf_counter() - start
        self.timing["eval_images"] += sum(len(self.stream.tasks[j].test) for j in columns)

    def run(self) -> dict[str, Any]:
        settings, run, stream, learner, strategy = self.settings, self.settings.run, self.stream, self.learner, self.strategy
        out, train_config = self.out, self.train_config
        separate = next((p for p in self.extra_plugins if isinstance(p, SeparatePromptsPlugin)), None)
        trainable = train_config.epochs > 0 and learner.num_trainable_parameters() > 0
        if not trainable:
            logger.info("%s has nothing to train (epochs %d); every row evaluates the initial prompts",
                        run.method, train_config.epochs)
        if self.resumed_from is None:
            self.evaluate(0)
        for index, experience in enumerate(self.benchmark.scenario.train_stream):
            if index < self.tasks_done:
                continue
            task = stream.tasks[index]
            logger.info("task %d/%d: %s (%d classes, %d training images)", index + 1, len(stream), task.name,
                        len(task.train_classes.classnames), len(task.train))
            # A task resumed after some epochs already has their records in the restored history.
            first_record = len(strategy.history) - strategy.start_epoch
            if trainable:
                start = time.perf_counter()
                strategy.train(experience, num_workers=train_config.num_workers,
                               drop_last=len(task.train) >= train_config.batch_size)
                self.timing["train_seconds"] += time.perf_counter() - start
            records = strategy.epoch_history()[first_record:]
            self.timing["epochs"] += len(records)
            self.task_history.append(records)
            learner.set_classnames(to_class_set(task.train_classes))
            if separate is None:
                save_checkpoint(out / "checkpoints" / f"after_task{index + 1}.pt", learner, task=index, stream=stream.label)
            self.evaluate(index + 1)
            self.tasks_done = index + 1
            write_json(out / "results.json", self.results(complete=False))
            strategy.save_training_state(out / RESUME_FILE, finished_epochs=0)

        learner.set_classnames(to_class_set(stream.tasks[-1].train_classes))
        if separate is not None:
            save_torch(out / "prompts_per_task.pt", {"schema": 1, "stream": stream.label, "states": separate.state_dict()})
        else:
            save_checkpoint(out / "model.pt", learner, stream=stream.label, seed=run.seed)
        results = self.results(complete=True)
        rows = len(results["accuracy_matrix"])
        plot_accuracy_matrix(
            results["accuracy_matrix"], results["accuracy_matrix_rows"], stream.task_names, out / "accuracy_matrix.png",
            title=f"{settings.method} on {stream.label} (seed {run.seed})",
        )
        write_json(out / "results.json", results)
        (out / RESUME_FILE).unlink(missing_ok=True)
        logger.info(
            "%s %s seed %d: Avg %s Last %s Transfer %s forgetting %s BWT %s (%d rows) -> %s",
            settings.method, stream.label, run.seed, *(_fmt(results.get(k)) for k in ("avg", "last", "transfer", "forgetting", "bwt")),
            rows, out / "results.json",
        )
        return results

    def results(self, complete: bool) -> dict[str, Any]:
        results = _results(self.settings, self.stream, self.benchmark, self.learner, self.metric, self.method_config,
                           self.train_config, self.plugin_configs, self.task_history, self.timing, complete)
        results["resumed_from"] = self.resumed_from
        results["eval_from_feature_cache"] = self.feature_test_stream is not None
        return results


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def _results(settings, stream: ContinualStream, benchmark, learner, metric: ContinualAccuracyMatrix, method_config,
             train_config, plugin_configs, task_history, timing, complete: bool) -> dict[str, Any]:
    run = settings.run
    matrix = metric.matrix()
    summary = summarize_matrix(matrix, metric.correct, metric.total, stream.task_aware)
    memory, memory_kind = peak_memory()
    skipped = benchmark.skipped_images()
    last_records = [r for records in task_history for r in records]
    results = {
        "schema": RESULTS_SCHEMA,
        "complete": complete,
        "protocol": PROTOCOL,
        "method": run.method,
        "plugins": list(settings.plugins),
        "method_label": settings.method,
        "dataset": stream.label,
        "stream": stream.kind,
        "order": stream.order,
        "task_aware": stream.task_aware,
        "split_convention": stream.split_convention,
        "class_order": list(stream.class_order) if stream.class_order is not None else None,
        "seed": run.seed,
        "shots": run.shots,
        "model": run.model,
        "pretrained": run.pretrained,
        "precision": run.precision,
        "tasks": [
            {
                "name": task.name,
                "dataset": task.dataset,
                "num_classes": len(task.classes.classnames),
                "num_train_classes": len(task.train_classes.classnames),
                "num_train_images": len(task.train),
                "num_test_images": len(task.test),
            }
            for task in stream.tasks
        ],
        "accuracy_matrix": matrix,
        "accuracy_matrix_rows": _row_labels(stream, len(matrix)),
        "accuracy_matrix_columns": stream.task_names,
        "correct_matrix": metric.correct,
        "total_matrix": metric.total,
        "avg": summary.get("avg"),
        "last": summary.get("last"),
        "transfer": summary.get("transfer"),
        "forgetting": summary.get("forgetting"),
        "bwt": summary.get("bwt"),
        "forgetting_per_task": summary.get("forgetting_per_task", []),
        "bwt_per_task": summary.get("bwt_per_task", []),
        "step_accuracy": summary.get("step_accuracy"),
        "zero_shot_mean": summary.get("zero_shot_mean"),
        "zero_shot_transfer": summary.get("zero_shot_transfer"),
        "metric_definitions": {
            "accuracy_matrix": "row 0: before training; row r: after task r; column j: test set of task j, top-1 %",
            "avg": "task-aware: mean over tasks of the column mean over the trained rows (MTIL Avg); "
                   "class-incremental: mean of the step accuracies",
            "last": "task-aware: mean of the last row (MTIL Last); class-incremental: last step accuracy",
            "transfer": "mean over tasks j >= 2 of the mean of rows 1..j-1 in column j (MTIL Transfer)",
            "forgetting": "mean over tasks j < T of max(rows j..T-1 of column j) - row T (Chaudhry)",
            "bwt": "mean over tasks j < T of row T - row j of column j (GEM)",
        },
        "trainable_params": learner.num_trainable_parameters(),
        "train_seconds": timing["train_seconds"],
        "train_seconds_per_epoch": timing["train_seconds"] / timing["epochs"] if timing["epochs"] else 0.0,
        "eval_seconds": timing["eval_seconds"],
        "eval_images_per_second": timing["eval_images"] / max(timing["eval_seconds"], 1e-9),
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "skipped_images": len(skipped),
        "skipped_image_paths": skipped[:100],
        "loss_terms": last_records[-1] if last_records else {},
        "epochs": task_history,
        "config": {
            "method": config_to_dict(method_config),
            "train": config_to_dict(train_config),
            "plugins": {name: config_to_dict(config) for name, config in plugin_configs.items()},
            "stream": config_to_dict(settings.stream),
            "run": run_config_record(run),
        },
        "torch_version": torch.__version__,
    }
    return _finite(results)


def continual_settings(base: list[RunSettings], stream: StreamSpec, plugins: list[str],
                       plugin_pairs: list[str]) -> list[ContinualSettings]:
    """Wrap each run of ``base`` (method x shots x seed) in a :class:`ContinualSettings` on ``stream``.

    Raises:
        ValueError: an unknown dataset or plugin, or invalid plugin options.
    """
    from benchmarks.datasets import dataset_info

    if stream.kind != "mtil":
        for name in stream.datasets:
            dataset_info(name)
    names = plugin_names(plugins)
    overrides = parse_plugin_overrides(plugin_pairs, names)
    return [ContinualSettings(run=run, stream=stream, plugins=tuple(names), plugin_overrides=overrides) for run in base]

"""Continual plugins on a two-task stream with toy-clip: optimizer, class names, LwF, EWC, replay,
separate prompts, the regularizers, the metric plugin and the plugin registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

from benchmarks.continual import datasets_stream
from learners import TrainConfig, build_learner, load_backbone
from learners.losses import knowledge_guided_distance
from plugins.avalanche_adapters import PromptEWCPlugin, PromptLwFPlugin, PromptReplayPlugin
from plugins.class_sets import ClassSetPlugin, to_class_set
from plugins.continual_metrics import ContinualAccuracyMatrix
from plugins.registry import (
    PluginContext,
    build_plugins,
    parse_plugin_overrides,
    plugin_names,
    split_plugin_overrides,
)
from plugins.regularizers import KnowledgeGuidedPlugin, SelfConsistencyPlugin
from plugins.separate_prompts import SeparatePromptsPlugin
from strategies.prompt_strategy import PromptStrategy
from tests.fixtures.coop_layouts import make_dataset


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("toy-clip", "none")


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_data")
    for name in ("eurosat", "dtd"):
        make_dataset(name, root, per_class=(2, 0, 1))
    return datasets_stream(["eurosat", "dtd"], root, shots=None)


@pytest.fixture(scope="module")
def scenario(stream):
    return stream.build_benchmark(image_size=32).scenario


class Recorder(SupervisedPlugin):
    """Records what the learner and optimizer hold at each callback of interest."""

    def __init__(self) -> None:
        super().__init__()
        self.train: list[dict] = []
        self.eval: list[dict] = []
        self.batches: list[dict] = []

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        self.train.append({
            "task": strategy.experience.current_experience,
            "classes": strategy.model.classes.classnames,
            "optimizer_state": len(strategy.optimizer.state),
            "ctx": strategy.model.ctx.detach().clone(),
        })

    def before_eval_exp(self, strategy, *args, **kwargs) -> None:
        self.eval.append({
            "task": strategy.experience.current_experience,
            "classes": strategy.model.classes.classnames,
            "ctx": strategy.model.ctx.detach().clone(),
        })

    def before_backward(self, strategy, *args, **kwargs) -> None:
        self.batches.append({
            "task": strategy.experience.current_experience,
            "labels": strategy.mb_y.tolist(),
            "tasks": strategy.mb_task_id.tolist(),
            "classes": len(strategy.model.classes),
            "logits": strategy.mb_output.detach().clone(),
            "ce": float(strategy._terms["ce"]),
        })


def make_strategy(backbone, stream, plugins, method: str = "coop", evaluator=None, **train):
    learner = build_learner(method, backbone)
    learner.set_classnames(to_class_set(stream.tasks[0].train_classes))
    class_plugin = ClassSetPlugin(stream)
    config = TrainConfig(**{"epochs": 1, "batch_size": 4, "warmup_epochs": 0, **train})
    strategy = PromptStrategy(learner=learner, train_config=config, plugins=[class_plugin, *plugins], evaluator=evaluator, progress=False)
    return learner, strategy, class_plugin


def train_all(strategy, scenario, stop: int | None = None) -> None:
    for index, experience in enumerate(scenario.train_stream):
        if stop is not None and index >= stop:
            break
        strategy.train(experience)


def history_terms(strategy) -> list[str]:
    return sorted({key for record in strategy.history for key in record})


# ---------------------------------------------------------------------------------------------
# Optimizer and class names


def test_optimizer_holds_only_prompt_parameters(backbone, stream, scenario) -> None:
    learner, strategy, _ = make_strategy(backbone, stream, [])
    train_all(strategy, scenario, stop=1)

    optimized = [p for group in strategy.optimizer.param_groups for p in group["params"]]
    clip = {id(p) for p in backbone.model.parameters()}
    assert [id(p) for p in optimized] == [id(p) for p in learner.trainable_parameters()]
    assert not clip & {id(p) for p in optimized}
    assert set(strategy.optimized_param_id) == {id(learner.ctx)}


@pytest.mark.parametrize(("reset", "state_at_second_task"), [(True, 0), (False, 1)])
def test_optimizer_state_follows_reset_config(backbone, stream, scenario, reset: bool, state_at_second_task: int) -> None:
    recorder = Recorder()
    _, strategy, _ = make_strategy(backbone, stream, [recorder], reset_optimizer=reset)
    train_all(strategy, scenario)

    assert recorder.train[0]["optimizer_state"] == 0
    assert recorder.train[1]["optimizer_state"] == state_at_second_task


def test_class_names_set_for_every_experience(backbone, stream, scenario) -> None:
    recorder = Recorder()
    learner, strategy, class_plugin = make_strategy(backbone, stream, [recorder])
    class_plugin.point = 0
    strategy.eval(list(scenario.test_stream))
    train_all(strategy, scenario)

    names = [task.classes.classnames for task in stream.tasks]
    assert [r["classes"] for r in recorder.eval] == names
    assert [r["classes"] for r in recorder.train] == names
    assert {b["classes"] for b in recorder.batches if b["task"] == 1} == {len(names[1])}


# ---------------------------------------------------------------------------------------------
# Avalanche's LwF, EWC and replay


def test_lwf_copy_shares_the_frozen_backbone(backbone, stream, scenario) -> None:
    lwf = PromptLwFPlugin(alpha=1.0, temperature=2.0)
    learner, strategy, _ = make_strategy(backbone, stream, [lwf])
    clip_tensors = {p.data_ptr() for p in backbone.model.parameters()}
    train_all(strategy, scenario, stop=1)
    previous = lwf.lwf.prev_model

    assert previous is not learner
    assert previous.backbone is learner.backbone
    assert [n for n, _ in previous.named_parameters()] == ["ctx"]
    assert previous.ctx.data_ptr() != learner.ctx.data_ptr()
    assert torch.equal(previous.ctx, learner.ctx)
    assert not {t.data_ptr() for t in previous.state_dict().values()} & clip_tensors

    strategy.train(scenario.train_stream[1])
    assert "lwf" in history_terms(strategy)
    assert all(math.isfinite(r["lwf"]) and r["lwf"] >= 0 for r in strategy.history if "lwf" in r)
    assert previous.classes.classnames == stream.tasks[1].classes.classnames


def test_ewc_penalty_over_prompts_only(backbone, stream, scenario) -> None:
    ewc = PromptEWCPlugin(100.0)
    _, strategy, _ = make_strategy(backbone, stream, [ewc], epochs=2)
    train_all(strategy, scenario)

    assert set(ewc.importances[0]) == {"ctx"}
    assert set(ewc.saved_params[0]) == {"ctx"}
    second_task = strategy.history[2:]
    assert all("ewc" in r and r["ewc"] >= 0 for r in second_task)
    assert any(r["ewc"] > 0 for r in second_task)
    assert "ewc" not in strategy.history[0]


def test_replay_union_classes_and_shifted_labels(backbone, stream, scenario) -> None:
    replay = PromptReplayPlugin(stream, mem_size=6, batch_size_mem=3)
    recorder = Recorder()
    learner, strategy, _ = make_strategy(backbone, stream, [replay, recorder])
    train_all(strategy, scenario)

    current, replayed = stream.tasks[1].classes.classnames, stream.tasks[0].classes.classnames
    assert recorder.train[1]["classes"] == current + replayed
    second = [b for b in recorder.batches if b["task"] == 1]
    pairs = [(label, task) for b in second for label, task in zip(b["labels"], b["tasks"])]
    assert {task for _, task in pairs} == {0, 1}
    assert all(5 <= label < 10 for label, task in pairs if task == 0)
    assert all(0 <= label < 5 for label, task in pairs if task == 1)
    for batch in second:
        labels = torch.tensor(batch["labels"])
        tasks = torch.tensor(batch["tasks"])
        columns = torch.arange(10)
        start = torch.where(tasks == 1, 0, 5).unsqueeze(1)
        masked = batch["logits"].masked_fill(~((columns >= start) & (columns < start + 5)), torch.finfo(torch.float32).min)
        assert batch["ce"] == pytest.approx(float(F.cross_entropy(masked, labels)), rel=1e-5)
        assert batch["ce"] < float(F.cross_entropy(batch["logits"], labels))


def test_separate_prompts_per_task(backbone, stream, scenario) -> None:
    separate = SeparatePromptsPlugin()
    recorder = Recorder()
    learner, strategy, class_plugin = make_strategy(backbone, stream, [separate, recorder], lr=0.05)
    initial = learner.ctx.detach().clone()
    train_all(strategy, scenario)
    class_plugin.point = 2
    strategy.eval(list(scenario.test_stream))

    assert recorder.train[1]["optimizer_state"] == 0
    assert torch.equal(recorder.train[1]["ctx"], initial)
    assert not torch.equal(separate.states[0]["ctx"], separate.states[1]["ctx"])
    assert torch.equal(recorder.eval[0]["ctx"], separate.states[0]["ctx"])
    assert torch.equal(recorder.eval[1]["ctx"], separate.states[1]["ctx"])
    assert set(separate.state_dict()) == {0, 1}


# ---------------------------------------------------------------------------------------------
# Regularizers


def test_knowledge_guided_plugin_term(backbone, stream, scenario) -> None:
    kg = KnowledgeGuidedPlugin(weight=8.0)
    learner, strategy, _ = make_strategy(backbone, stream, [kg], lr=1e-12)
    with torch.no_grad():
        expected = 8.0 * float(knowledge_guided_distance(learner.text_features(), learner.class_prompt_features(learner.classes)))
    train_all(strategy, scenario, stop=1)

    assert strategy.history[0]["plugin_kg"] == pytest.approx(expected, rel=1e-3)
    cached = list(kg.handcrafted._features.values())
    assert [tuple(f.shape) for f in cached] == [(5, backbone.embed_dim)]


def test_self_consistency_plugin_terms(backbone, stream, scenario) -> None:
    src = SelfConsistencyPlugin(templates="select7")
    _, coop, _ = make_strategy(backbone, stream, [src])
    train_all(coop, scenario, stop=1)
    src_deep = SelfConsistencyPlugin(templates=None)
    _, ivlp, _ = make_strategy(backbone, stream, [src_deep], method="ivlp")
    train_all(ivlp, scenario, stop=1)

    assert {"plugin_scl_text", "plugin_scl_logits"} <= set(history_terms(coop))
    assert "plugin_scl_image" not in history_terms(coop)
    assert {"plugin_scl_text", "plugin_scl_image", "plugin_scl_logits"} <= set(history_terms(ivlp))
    assert all(ivlp.history[0][k] > 0 for k in ("plugin_scl_text", "plugin_scl_image"))


def test_regularizer_rejects_prompt_sets(backbone, stream, scenario) -> None:
    _, strategy, _ = make_strategy(backbone, stream, [KnowledgeGuidedPlugin()], method="plot")

    with pytest.raises(NotImplementedError, match=r"\(K, E\)"):
        train_all(strategy, scenario, stop=1)


# ---------------------------------------------------------------------------------------------
# Metric plugin through Avalanche's EvaluationPlugin


def test_metric_plugin_fills_matrix_and_logs(backbone, stream, scenario) -> None:
    metric = ContinualAccuracyMatrix(len(stream))
    evaluator = EvaluationPlugin(metric, loggers=[])
    _, strategy, class_plugin = make_strategy(backbone, stream, [], evaluator=evaluator)
    for point in range(3):
        if point:
            strategy.train(scenario.train_stream[point - 1])
        class_plugin.point = metric.point = point
        strategy.eval(list(scenario.test_stream))

    matrix = metric.matrix()
    logged = evaluator.get_all_metrics()
    assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)
    assert metric.total == [[5.0, 5.0]] * 3
    assert matrix[2][1] == pytest.approx(strategy.accuracy.accuracy)
    assert logged["Top1_Acc_Exp/eval_phase/test_stream/Task001/Exp001"][1] == pytest.approx([row[1] for row in matrix])
    assert logged["Continual/Avg"][0] == [1, 2]
    assert logged["Continual/Last"][1][-1] == pytest.approx(sum(matrix[2]) / 2)


# ---------------------------------------------------------------------------------------------
# Registry


def test_plugin_names_order_and_errors() -> None:
    assert plugin_names(["replay,lwf", "kg"]) == ["kg", "lwf", "replay"]
    assert plugin_names(["none"]) == []
    with pytest.raises(ValueError, match="Did you mean ewc"):
        plugin_names(["ewx"])
    with pytest.raises(ValueError, match="twice"):
        plugin_names(["lwf", "lwf"])
    with pytest.raises(ValueError, match="separate_prompts"):
        plugin_names(["separate-prompts,ewc"])


def test_plugin_overrides_parsed_per_plugin() -> None:
    shared, plugin_pairs = split_plugin_overrides(["n_ctx=8", "ewc.ewc_lambda=5", "train.lr=0.1", "replay.mem_size=50"])

    assert shared == ["n_ctx=8", "train.lr=0.1"]
    assert parse_plugin_overrides(plugin_pairs, ["ewc", "replay"]) == {"ewc": {"ewc_lambda": 5.0}, "replay": {"mem_size": 50}}
    with pytest.raises(ValueError, match="does not select"):
        parse_plugin_overrides(plugin_pairs, ["ewc"])
    with pytest.raises(ValueError, match="decay_factor"):
        parse_plugin_overrides(["ewc.mode=online"], ["ewc"])


def test_build_plugins_in_registry_order(stream) -> None:
    plugins, configs = build_plugins(["replay", "gpa", "src"], PluginContext(stream, epochs=20), {"replay": {"mem_size": 10}})

    assert [type(p).__name__ for p in plugins] == ["GaussianPromptAggregationPlugin", "SelfConsistencyPlugin", "PromptReplayPlugin"]
    assert plugins[0].mean == pytest.approx(15.0)
    assert plugins[2].mem_size == 10
    assert list(configs) == ["gpa", "src", "replay"]

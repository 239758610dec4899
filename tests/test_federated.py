"""Federated prompt learning without Ray: ClientApp handlers called directly, strategy
aggregation over mock replies, settings, protocol defaults and the in-process fallback run.

The Ray simulation runs end to end in tests/test_federated_ray.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from torch import nn

import run_benchmark
from learners import get_method
from learners.coop import CoOp
from plugins.proximal import ProximalTermPlugin
from strategies import federated, fl_apps
from strategies.federated import (
    LOCAL_ACCURACY_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_DIGEST_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
    FederatedSettings,
    build_learner,
    federated_backbone,
    load_partition,
    load_round_state,
    resolve_plan,
)
from strategies.fl_apps import ARRAYS_KEY, CONFIG_KEY, LOCAL_STATE_KEY, client_app
from strategies.fl_inprocess import InProcessGrid
from strategies.feature_cache import FeatureCache
from strategies.fl_strategies import TIMEOUT_REASON, build_strategy, evaluate_metrics_mean, record_bytes
from tests.fixtures.coop_layouts import make_dataset


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A 4-class fake Caltech101 with 4 train and 2 test images per class."""
    root = tmp_path_factory.mktemp("fl_data")
    make_dataset("caltech101", root, num_classes=4, per_class=(4, 1, 2))
    return root


class CoOpWithPersonalScale(CoOp):
    """CoOp plus a personalized logit scale that never leaves the client."""

    local_state_prefixes = ("personal",)

    def __init__(self, backbone, config) -> None:
        super().__init__(backbone, config)
        self.personal = nn.Parameter(torch.zeros(1))

    def cosine_logits(self, image_features, text_features):
        return super().cosine_logits(image_features, text_features) * (1.0 + self.personal)


@pytest.fixture
def personal_method(monkeypatch):
    """Make method name "coop-personal" resolve to CoOpWithPersonalScale inside the federated code."""
    spec = dataclasses.replace(get_method("coop"), name="coop-personal", learner_class=CoOpWithPersonalScale)
    real = federated.get_method
    monkeypatch.setattr(federated, "get_method", lambda name: spec if name == "coop-personal" else real(name))
    return "coop-personal"


def settings_for(root, tmp_path, **changes) -> FederatedSettings:
    values = dict(method="coop", datasets=("caltech101",), partition="fedotp", clients=2, shots=2, rounds=2,
                  local_epochs=1, batch_size=4, pretrained="none", data_root=str(root),
                  cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "runs"))
    values.update(changes)
    return FederatedSettings(**values)


def train_message(settings: FederatedSettings, arrays: dict, server_round: int, node_id: int = 7, **config) -> Message:
    plan = resolve_plan(settings)
    content = RecordDict({
        ARRAYS_KEY: ArrayRecord(torch_state_dict=arrays),
        CONFIG_KEY: ConfigRecord({**settings.to_run_config(), SERVER_ROUND_KEY: server_round,
                                  PARTITION_DIGEST_KEY: load_partition(plan).digest(), **config}),
    })
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)


def node_context(partition_id: int, num_partitions: int = 2) -> Context:
    return Context(run_id=0, node_id=7, node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                   state=RecordDict(), run_config={})


@pytest.fixture
def task_identity():
    # Messages built outside a Grid read the sender's identity; the in-process grid sets it.
    InProcessGrid(client_app, 1)


# ---------------------------------------------------------------------------------------------
# Settings and protocol defaults


def test_run_config_round_trip():
    settings = FederatedSettings(datasets=("caltech101", "dtd"), partition="multidomain", alpha=0.5, shots=0,
                                 overrides="n_ctx=4 train.lr=0.01", strategy_options="proximal_mu=0.1")
    config = settings.to_run_config()
    assert config["dataset"] == "caltech101,dtd"
    assert config["set"] == "n_ctx=4 train.lr=0.01"
    assert "clients" not in config  # None fields stay out
    assert FederatedSettings.from_run_config(config) == settings


def test_pyproject_run_config_is_valid():
    import tomllib

    with open("pyproject.toml", "rb") as handle:
        app = tomllib.load(handle)["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "strategies.fl_apps:server_app", "clientapp": "strategies.fl_apps:client_app"}
    settings = FederatedSettings.from_run_config(app["config"])
    assert settings.clients is None
    assert settings.rounds is None  # "" leaves them to the protocol
    assert settings.datasets == ("digits",)


def test_run_config_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown run config keys"):
        FederatedSettings.from_run_config({"local-epoch": 2})


def test_fedtpg_protocol_defaults():
    plan = resolve_plan(FederatedSettings(datasets=("caltech101",), partition="fedtpg"))
    assert plan.rounds == 500
    assert plan.local_epochs == 1
    assert plan.partition.shots == 8
    assert plan.partition.num_clients is None
    assert plan.method_config.n_ctx == 4
    assert plan.method_config.ctx_init is None
    assert plan.train_config.lr == 0.003
    assert plan.train_config.weight_decay == 1e-5
    assert plan.train_config.batch_size == 200
    assert plan.train_config.epochs == 500
    assert plan.client_classes == "own"


def test_single_client_partition_is_reported(fake_root, tmp_path, caplog):
    # 4 classes in chunks of FedTPG's 20 classes per client make one client.
    partition = load_partition(resolve_plan(settings_for(fake_root, tmp_path, partition="fedtpg", clients=None)))
    assert partition.num_clients == 1
    assert "the fedtpg partition of caltech101 has a single client" in caplog.text
    assert "lower --classes-per-client" in caplog.text


def test_fedotp_defaults_and_user_values():
    plan = resolve_plan(FederatedSettings(datasets=("dtd",), partition="fedotp", shots=4))
    assert plan.train_config.batch_size == 4  # FedOTP: batch = shots
    assert plan.method_config.n_ctx == 16
    assert plan.client_classes == "all"
    plan = resolve_plan(FederatedSettings(datasets=("dtd",), partition="fedotp", rounds=3, local_epochs=2, lr=0.01,
                                          overrides="n_ctx=2 train.momentum=0.5"))
    assert plan.rounds == 3
    assert plan.train_config.epochs == 6
    assert plan.train_config.lr == 0.01
    assert plan.train_config.momentum == 0.5
    assert plan.method_config.n_ctx == 2


def test_epochs_override_is_rejected():
    with pytest.raises(ValueError, match="--rounds and --local-epochs"):
        resolve_plan(FederatedSettings(overrides="train.epochs=3"))


# ---------------------------------------------------------------------------------------------
# ClientApp handlers, called directly


def test_train_reply_carries_global_keys_only(fake_root, tmp_path, personal_method, task_identity):
    settings = settings_for(fake_root, tmp_path, method=personal_method)
    plan = resolve_plan(settings)
    learner = build_learner(plan)
    shared, local = learner.split_state()
    assert sorted(shared) == ["ctx"]
    assert sorted(local) == ["personal"]

    context = node_context(1)
    reply = client_app(train_message(settings, shared, server_round=1), context)

    assert not reply.has_error()
    assert set(reply.content[ARRAYS_KEY].keys()) == {"ctx"}
    metrics = reply.content["metrics"]
    partition = load_partition(plan)
    assert metrics[NUM_EXAMPLES_KEY] == len(partition.clients[1].train) == 2 * len(partition.clients[1].labels)
    assert metrics[PARTITION_ID_KEY] == 1
    assert np.isfinite(metrics[TRAIN_LOSS_KEY])
    trained = reply.content[ARRAYS_KEY].to_torch_state_dict()["ctx"]
    assert not torch.equal(trained, shared["ctx"])
    stored = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    assert set(stored) == {"personal"}
    assert float(stored["personal"]) != 0.0
    assert list(context.state.keys()) == [LOCAL_STATE_KEY]  # no backbone or data in the Context
    assert federated_backbone(settings) is federated_backbone(settings)  # one backbone per process


def test_local_state_survives_rounds(fake_root, tmp_path, personal_method, task_identity, monkeypatch):
    settings = settings_for(fake_root, tmp_path, method=personal_method)
    shared, _ = build_learner(resolve_plan(settings)).split_state()
    seen = []
    real_train = fl_apps.local_train

    def recording_train(plan, partition, client_id, global_state, local_state, **kwargs):
        seen.append(None if local_state is None else {k: v.clone() for k, v in local_state.items()})
        return real_train(plan, partition, client_id, global_state, local_state, **kwargs)

    monkeypatch.setattr(fl_apps, "local_train", recording_train)
    context = node_context(0)
    first = client_app(train_message(settings, shared, server_round=1), context)
    after_first = context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    client_app(train_message(settings, first.content[ARRAYS_KEY].to_torch_state_dict(), server_round=2), context)
    after_second = context.state[LOCAL_STATE_KEY].to_torch_state_dict()

    assert seen[0] is None
    assert torch.equal(seen[1]["personal"], after_first["personal"])
    assert not torch.equal(after_second["personal"], after_first["personal"])


def test_evaluate_reply_reports_local_accuracy(fake_root, tmp_path, personal_method, task_identity):
    settings = settings_for(fake_root, tmp_path, method=personal_method)
    plan = resolve_plan(settings)
    shared, _ = build_learner(plan).split_state()
    message = train_message(settings, shared, server_round=1)
    message = Message(message.content, dst_node_id=7, message_type=MessageType.EVALUATE)
    reply = client_app(message, node_context(1))
    metrics = reply.content["metrics"]
    assert metrics[NUM_EXAMPLES_KEY] == len(load_partition(plan).clients[1].test)
    assert 0.0 <= metrics[LOCAL_ACCURACY_KEY] <= 100.0
    assert "arrays" not in reply.content


def test_local_key_in_global_state_is_rejected(fake_root, tmp_path, personal_method):
    plan = resolve_plan(settings_for(fake_root, tmp_path, method=personal_method))
    learner = build_learner(plan)
    with pytest.raises(ValueError, match="local keys"):
        load_round_state(learner, learner.learnable_state_dict(), None)


def test_partition_digest_mismatch_is_rejected(fake_root, tmp_path, task_identity):
    settings = settings_for(fake_root, tmp_path)
    shared, _ = build_learner(resolve_plan(settings)).split_state()
    message = train_message(settings, shared, server_round=1)
    message.content[CONFIG_KEY][PARTITION_DIGEST_KEY] = "0" * 64
    with pytest.raises(ValueError, match="digest mismatch"):
        client_app(message, node_context(0))


def test_proximal_term_value():
    reference = {"ctx": torch.zeros(2, 3)}
    learner = nn.Module()
    learner.ctx = nn.Parameter(torch.full((2, 3), 0.5))

    class Recorder:
        model = learner
        terms: dict = {}

        def add_loss_term(self, name, value):
            self.terms[name] = value

    strategy = Recorder()
    ProximalTermPlugin(0.2, reference).before_backward(strategy)
    # (mu / 2) * ||w - w0||^2 = 0.1 * 6 * 0.25
    assert float(strategy.terms["prox"].detach()) == pytest.approx(0.15)


# ---------------------------------------------------------------------------------------------
# Aggregation over mock replies


def _reply(message: Message, ctx: np.ndarray, num_examples: int, partition_id: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord(torch_state_dict={"ctx": torch.from_numpy(ctx)}),
        "metrics": MetricRecord({NUM_EXAMPLES_KEY: num_examples, TRAIN_LOSS_KEY: float(partition_id),
                                 PARTITION_ID_KEY: partition_id}),
    })
    return Message(content, reply_to=message)


def _round_one(strategy, grid):
    initial = ArrayRecord(torch_state_dict={"ctx": torch.zeros(2, 4)})
    return list(strategy.configure_train(1, initial, ConfigRecord({"method": "coop"}), grid)), initial


def test_fedavg_is_weighted_average():
    grid = InProcessGrid(client_app, 3)
    strategy = build_strategy("fedavg", num_clients=3, fraction_train=1.0, fraction_evaluate=1.0, failure_tolerance=0.5)
    messages, initial = _round_one(strategy, grid)
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=(2, 4)).astype(np.float32) for _ in messages]
    sizes = [3, 5, 12]
    replies = [_reply(m, u, n, i) for i, (m, u, n) in enumerate(zip(messages, updates, sizes))]

    arrays, metrics = strategy.aggregate_train(1, replies)

    expected = sum(u * n for u, n in zip(updates, sizes)) / sum(sizes)
    np.testing.assert_allclose(arrays["ctx"].numpy(), expected, rtol=1e-6)
    assert metrics[TRAIN_LOSS_KEY] == pytest.approx((0 * 3 + 1 * 5 + 2 * 12) / 20)
    record = strategy.round_records[1]
    assert record["aggregated"] is True
    assert record["array_bytes_sent"] == 3 * initial.count_bytes()
    assert record["bytes_sent"] == sum(record_bytes(m.content)[0] for m in messages)
    assert record["bytes_received"] == sum(record_bytes(r.content)[0] for r in replies)


def test_failed_client_is_left_out():
    grid = InProcessGrid(client_app, 3)
    strategy = build_strategy("fedavg", num_clients=3, fraction_train=1.0, fraction_evaluate=1.0, failure_tolerance=0.5)
    messages, _ = _round_one(strategy, grid)
    updates = [np.full((2, 4), v, dtype=np.float32) for v in (1.0, 2.0, 4.0)]
    replies = [
        _reply(messages[0], updates[0], 1, 0),
        Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "RuntimeError: out of memory"), reply_to=messages[1]),
        _reply(messages[2], updates[2], 3, 2),
    ]

    arrays, _ = strategy.aggregate_train(1, replies)

    np.testing.assert_allclose(arrays["ctx"].numpy(), np.full((2, 4), (1.0 * 1 + 4.0 * 3) / 4))
    record = strategy.round_records[1]
    assert record["aggregated"] is True
    assert len(record["failures"]) == 1
    assert record["failures"][0]["node_id"] == messages[1].metadata.dst_node_id
    assert "out of memory" in record["failures"][0]["reason"]


def test_round_beyond_tolerance_is_not_aggregated():
    grid = InProcessGrid(client_app, 3)
    strategy = build_strategy("fedavg", num_clients=3, fraction_train=1.0, fraction_evaluate=1.0, failure_tolerance=0.5)
    messages, _ = _round_one(strategy, grid)
    # One error and one missing reply (timed out): 2 of 3 failed, above 0.5 * 3.
    replies = [
        _reply(messages[0], np.ones((2, 4), dtype=np.float32), 1, 0),
        Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=messages[1]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert metrics is None
    record = strategy.round_records[1]
    assert record["aggregated"] is False
    assert [f["reason"] for f in record["failures"]] == ["boom", TIMEOUT_REASON]


def test_strategies_by_name():
    grid = InProcessGrid(client_app, 2)
    fedprox = build_strategy("FedProx", num_clients=2, fraction_train=1.0, fraction_evaluate=0.0,
                             failure_tolerance=0.5, options="proximal_mu=0.1")
    messages = list(fedprox.configure_train(1, ArrayRecord(torch_state_dict={"ctx": torch.zeros(1)}), ConfigRecord(), grid))
    assert messages[0].content["config"]["proximal-mu"] == 0.1
    fedadam = build_strategy("fedadam", num_clients=2, fraction_train=0.5, fraction_evaluate=1.0,
                             failure_tolerance=0.5, options="eta=0.01")
    assert fedadam.eta == 0.01
    assert type(fedadam).__name__ == "TrackedFedAdam"
    with pytest.raises(ValueError, match="Did you mean fedavg"):
        build_strategy("fedavgg", num_clients=2, fraction_train=1.0, fraction_evaluate=1.0, failure_tolerance=0.5)
    with pytest.raises(ValueError, match="no option 'etaa'"):
        build_strategy("fedadam", num_clients=2, fraction_train=1.0, fraction_evaluate=1.0, failure_tolerance=0.5,
                       options="etaa=1")
    with pytest.raises(ValueError, match="--fraction"):
        build_strategy("fedavg", num_clients=2, fraction_train=1.0, fraction_evaluate=1.0, failure_tolerance=0.5,
                       options="fraction_train=0.5")


def test_sampling_draws_new_clients_each_round():
    def sample_rounds(seed: int) -> list[list[int]]:
        grid = InProcessGrid(client_app, 6)
        strategy = build_strategy("fedavg", num_clients=6, fraction_train=0.5, fraction_evaluate=0.0,
                                  failure_tolerance=0.5, seed=seed)
        arrays = ArrayRecord(torch_state_dict={"ctx": torch.zeros(1)})
        sampled = []
        for server_round in range(1, 5):
            random.seed(0)  # building a learner reseeds the module-level generator every round
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            sampled.append(sorted(m.metadata.dst_node_id for m in messages))
            assert random.random() == random.Random(0).random()  # the outer state is left as it was
        return sampled

    sampled = sample_rounds(seed=1)
    assert all(len(nodes) == 3 for nodes in sampled)
    assert len({tuple(nodes) for nodes in sampled}) > 1
    assert sample_rounds(seed=1) == sampled


def test_local_accuracy_mean_skips_empty_clients():
    records = [
        RecordDict({"m": MetricRecord({NUM_EXAMPLES_KEY: 10, LOCAL_ACCURACY_KEY: 50.0})}),
        RecordDict({"m": MetricRecord({NUM_EXAMPLES_KEY: 30, LOCAL_ACCURACY_KEY: 90.0})}),
        RecordDict({"m": MetricRecord({NUM_EXAMPLES_KEY: 0, LOCAL_ACCURACY_KEY: float("nan")})}),
    ]
    result = evaluate_metrics_mean(records, NUM_EXAMPLES_KEY)
    assert result[f"{LOCAL_ACCURACY_KEY}-mean"] == pytest.approx(70.0)
    assert result[f"{LOCAL_ACCURACY_KEY}-weighted"] == pytest.approx(80.0)


# ---------------------------------------------------------------------------------------------
# In-process fallback through the command line


@pytest.mark.slow
def test_inprocess_run_reports_failed_client(fake_root, tmp_path, monkeypatch):
    real_train = fl_apps.local_train

    def flaky_train(plan, partition, client_id, global_state, local_state, server_round, **kwargs):
        if client_id == 2 and server_round == 1:
            raise RuntimeError("simulated client crash")
        return real_train(plan, partition, client_id, global_state, local_state, server_round=server_round, **kwargs)

    monkeypatch.setattr(fl_apps, "local_train", flaky_train)
    encoded = []
    encode = FeatureCache._encode

    def counting_encode(self, learner, source, dataset, rows):
        encoded.append(len(rows))
        return encode(self, learner, source, dataset, rows)

    monkeypatch.setattr(FeatureCache, "_encode", counting_encode)
    status = run_benchmark.main([
        "federated", "--method", "coop", "--dataset", "caltech101", "--partition", "base2novel",
        "--base-scheme", "dirichlet", "--clients", "3", "--alpha", "1.0", "--rounds", "2", "--local-epochs", "1",
        "--shots", "2", "--batch-size", "4", "--pretrained", "none", "--backend", "inprocess",
        "--data-root", str(fake_root), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs"),
    ])
    assert status == 0
    run = tmp_path / "runs/federated/caltech101/coop/base2novel-dirichlet-a1-c3-fedavg-s2-r2e1/seed1"
    results = json.loads((run / "results.json").read_text())

    assert results["complete"] is True
    assert results["backend"] == "inprocess"
    assert results["trainable_params"] == results["global_state_params"] == 8 * 64  # n_ctx 8 (PromptFolio)
    first, second = results["rounds"]
    assert first["clients_failed"] == 1
    assert first["aggregated"] is True
    assert "simulated client crash" in first["failures"][0]["reason"]
    assert first["failures"][0]["partition_id"] in (2, None)
    assert second["clients_failed"] == 0
    for row in results["rounds"]:
        assert row["bytes_sent"] > row["array_bytes_sent"]
        assert row["array_bytes_sent"] > 0
        assert row["bytes_received"] > 0
        for key in ("global_accuracy", "base_accuracy", "novel_accuracy", "hm", "local_accuracy_mean"):
            assert 0.0 <= row[key] <= 100.0
        assert set(row["local_accuracy_per_client"]) <= {"0", "1", "2"}
    for key in ("global_accuracy", "base_accuracy", "novel_accuracy", "hm", "local_accuracy_mean"):
        assert results[key] == second[key]  # the last round, never the best
    assert results["hm"] == pytest.approx(2 * second["base_accuracy"] * second["novel_accuracy"]
                                          / (second["base_accuracy"] + second["novel_accuracy"]))
    # Every evaluation after the first read cached features: the server's three test lists (all,
    # base and novel classes of 4 test images each) and each client's were encoded once in 2 rounds.
    client_tests = [c["num_test"] for c in results["client_sizes"] if c["num_test"] > 0]
    assert sorted(encoded) == sorted([8, 4, 4, *client_tests])

    partition = json.loads((run / "partitions.json").read_text())
    assert partition["digest"] == results["partition_digest"]
    assert all(max(c["labels"]) < 2 for c in partition["clients"])  # base classes of 4: labels 0 and 1
    with open(run / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert rows[0]["clients_failed"] == "1"
    assert (run / "rounds.png").stat().st_size > 0
    assert (run / "global_state.pt").is_file()

"""The Flower apps of vlprompt: a ``ClientApp`` that trains and evaluates a prompt learner on its
partition, and a ``ServerApp`` that drives a Flower strategy over the rounds.

Run them with ``flwr run`` (the components are declared in pyproject.toml as
``strategies.fl_apps:server_app`` and ``strategies.fl_apps:client_app``), or in one process
through :func:`run_federated` (``run_benchmark.py federated``).

Message layout:

- train message: ``arrays`` (the global learnable state), ``config`` (the run config, the
  server round, the partition digest, and ``proximal-mu`` under FedProx);
- train reply: ``arrays`` (the global part only) and ``metrics`` (``num-examples``,
  ``train-loss``, ``partition-id``, one ``term-<name>`` per extra loss term);
- evaluate message: ``arrays`` and ``config``; reply: ``metrics`` (``num-examples`` test
  images, ``local-accuracy``, ``partition-id``).

A client's local (personalized) state lives in ``context.state["local-state"]``, and also in
``client-state-dir`` where the run config or node config names one (see
:mod:`strategies.fl_resume`); the frozen backbone lives in a per-process cache and never enters
a message or a Context.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch  # noqa: F401  ArrayRecord.to_torch_state_dict needs torch imported in this module
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from benchmarks.partitions import FederatedPartition, write_partition
from learners.config import config_to_dict

from .federated import (
    LOCAL_ACCURACY_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_DIGEST_KEY,
    PARTITION_ID_KEY,
    PROXIMAL_MU_KEY,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
    FederatedPlan,
    FederatedSettings,
    build_learner,
    federated_backbone,
    load_partition,
    local_evaluate,
    local_train,
    resolve_plan,
    run_dir,
)
from .fl_metrics import RunRecorder
from .fl_resume import (
    CLIENT_STATE_DIR,
    RESUME_FILE,
    RUN_TOKEN_KEY,
    ClientStateFile,
    RoundCheckpoint,
    load_round_checkpoint,
    restore_rng,
    run_fingerprint,
)
from .fl_strategies import build_strategy, record_bytes

logger = logging.getLogger(__name__)

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
LOCAL_STATE_KEY = "local-state"
NODE_CONFIG_KEYS = ("data-root", "cache-dir", "client-state-dir", "device")
"""Run-config keys a SuperNode may override in its node config (paths and devices differ per machine)."""
TELEMETRY_ENVIRONMENT = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def disable_telemetry() -> None:
    """Turn Flower's telemetry and Ray's usage statistics off for this process and its children."""
    os.environ.update(TELEMETRY_ENVIRONMENT)


# ---------------------------------------------------------------------------------------------
# ClientApp

client_app = ClientApp()


_DIGESTS: dict[int, str] = {}


def _partition_digest(partition: FederatedPartition) -> str:
    if id(partition) not in _DIGESTS:
        _DIGESTS[id(partition)] = partition.digest()
    return _DIGESTS[id(partition)]


def client_plan(message: Message, context: Context) -> tuple[FederatedPlan, FederatedPartition, int]:
    """Resolve the plan, the federation and this client's partition id from the Context and the message.

    The message's config (sent by the server) wins over the Context's run config; the node
    config wins for ``data-root``, ``cache-dir``, ``client-state-dir`` and ``device``.

    Raises:
        KeyError: The node config has no ``partition-id``.
        ValueError: The locally built partition differs from the server's (digest mismatch),
            or the node's ``num-partitions`` differs from the federation size.
    """
    values: dict[str, Any] = dict(context.run_config)
    config = message.content[CONFIG_KEY]
    values.update(dict(config))
    for key in NODE_CONFIG_KEYS:
        if key in context.node_config:
            values[key] = context.node_config[key]
    plan = resolve_plan(FederatedSettings.from_run_config(values, strict=False))
    partition = load_partition(plan)
    if PARTITION_ID_KEY not in context.node_config:
        raise KeyError(f"node config has no {PARTITION_ID_KEY!r}; start the SuperNode with --node-config "
                       f"\"partition-id=<i> num-partitions={partition.num_clients}\"")
    client_id = int(context.node_config[PARTITION_ID_KEY])
    expected = context.node_config.get("num-partitions")
    if expected is not None and int(expected) != partition.num_clients:
        raise ValueError(f"node config sets num-partitions={expected}, but the run's partition has "
                         f"{partition.num_clients} clients")
    digest = config.get(PARTITION_DIGEST_KEY)
    if digest is not None and digest != _partition_digest(partition):
        raise ValueError(
            "this client's partition differs from the server's (digest mismatch); check that every machine "
            "has the same dataset files and split JSON under its data root"
        )
    return plan, partition, client_id


def client_state_file(plan: FederatedPlan, client_id: int, config: ConfigRecord) -> ClientStateFile | None:
    """Return the file that keeps this client's local state on its disk, or None where the run
    names no ``client-state-dir`` (or the server sent no run token)."""
    directory = plan.settings.client_state_dir
    token = config.get(RUN_TOKEN_KEY)
    if not directory or token is None:
        return None
    return ClientStateFile(Path(directory) / f"client{client_id}.pt", str(token))


def read_local_state(context: Context, state_file: ClientStateFile | None,
                     latest_round: int) -> dict[str, torch.Tensor] | None:
    """Return the client's local state after its last round up to ``latest_round``, or None
    before its first round.

    The Context contains it while the client process lives. A client that starts afresh (its
    process died and the run was resumed) reads its ``state_file``.
    """
    if LOCAL_STATE_KEY in context.state:
        return context.state[LOCAL_STATE_KEY].to_torch_state_dict()
    # NOTE: without a client-state-dir the local state lives in the Context only, so after a
    # resume (a new process, or a new `flwr run` with resume=true) it starts from its initial values.
    if state_file is None:
        return None
    return state_file.load(latest_round)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this client's partition from the global state; reply with the global part."""
    plan, partition, client_id = client_plan(msg, context)
    config = msg.content[CONFIG_KEY]
    server_round = int(config[SERVER_ROUND_KEY])
    state_file = client_state_file(plan, client_id, config)
    update = local_train(
        plan,
        partition,
        client_id,
        msg.content[ARRAYS_KEY].to_torch_state_dict(),
        read_local_state(context, state_file, latest_round=server_round - 1),
        server_round=server_round,
        proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
    )
    if update.local_state:
        context.state[LOCAL_STATE_KEY] = ArrayRecord(torch_state_dict=update.local_state)
        if state_file is not None:
            state_file.save(server_round, update.local_state)
    metrics = MetricRecord({
        NUM_EXAMPLES_KEY: update.num_examples,
        TRAIN_LOSS_KEY: update.loss_terms["loss"],
        PARTITION_ID_KEY: client_id,
        **{f"term-{k}": v for k, v in update.loss_terms.items() if k != "loss"},
    })
    content = RecordDict({ARRAYS_KEY: ArrayRecord(torch_state_dict=update.global_state), METRICS_KEY: metrics})
    return Message(content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalized accuracy of the global state plus this client's local state on its test set."""
    plan, partition, client_id = client_plan(msg, context)
    config = msg.content[CONFIG_KEY]
    local_state = read_local_state(context, client_state_file(plan, client_id, config),
                                   latest_round=int(config[SERVER_ROUND_KEY]))
    result = local_evaluate(plan, partition, client_id, msg.content[ARRAYS_KEY].to_torch_state_dict(), local_state)
    metrics = MetricRecord({
        NUM_EXAMPLES_KEY: result["total"],
        LOCAL_ACCURACY_KEY: float(result["accuracy"]),
        PARTITION_ID_KEY: client_id,
    })
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


# ---------------------------------------------------------------------------------------------
# ServerApp


def read_resume_checkpoint(settings: FederatedSettings) -> dict[str, Any] | None:
    """Return the run folder's round checkpoint if ``settings.resume`` is set and one exists.

    Without ``resume``, a checkpoint left by an interrupted run is deleted with a warning, so
    the run starts over.

    Raises:
        ValueError: The checkpoint was saved with other settings, or cannot be read.
    """
    plan = resolve_plan(settings)
    partition = load_partition(plan)
    path = run_dir(plan, partition.num_clients) / RESUME_FILE
    if not path.is_file():
        if settings.resume:
            logger.info("no round checkpoint at %s; starting from round 1", path)
        return None
    if not settings.resume:
        logger.warning("%s is the round checkpoint of an interrupted run; starting over (pass --resume to continue it)",
                       path)
        path.unlink()
        return None
    fingerprint = run_fingerprint(settings, _partition_digest(partition))
    return load_round_checkpoint(path, fingerprint, plan.rounds)


def run_server(grid: Grid, settings: FederatedSettings, backend: str) -> dict[str, Any]:
    """Run every round of ``settings`` on ``grid`` and write the result files.

    With ``settings.resume`` and a round checkpoint in the run folder, the run continues after
    the checkpoint's round (see :mod:`strategies.fl_resume`).

    Returns:
        The complete ``results.json`` payload.
    """
    plan = resolve_plan(settings)
    partition = load_partition(plan)
    out = run_dir(plan, partition.num_clients)
    out.mkdir(parents=True, exist_ok=True)
    saved = read_resume_checkpoint(settings)
    partition_file = write_partition(out / "partitions.json", partition)
    digest = _partition_digest(partition)

    learner = build_learner(plan)
    if learner.num_trainable_parameters() == 0:
        raise ValueError(f"method {settings.method!r} has no trainable parameters, so there is nothing to federate; "
                         "evaluate it with another protocol")
    shared, local = learner.split_state()
    initial = ArrayRecord(torch_state_dict=shared)
    strategy = build_strategy(
        settings.strategy,
        num_clients=partition.num_clients,
        fraction_train=plan.fraction,
        fraction_evaluate=settings.fraction_evaluate,
        failure_tolerance=settings.failure_tolerance,
        options=settings.strategy_options,
        client_lr=plan.train_config.lr,
        seed=settings.seed,
    )
    rounds_resumed = saved["round"] if saved is not None else 0
    header = {
        "method": settings.method,
        "dataset": settings.dataset,
        "datasets": list(settings.datasets),
        "seed": settings.seed,
        "shots": plan.partition.shots,
        "model": settings.model,
        "pretrained": settings.pretrained,
        "precision": settings.precision,
        "partition": settings.partition,
        "partition_config": dataclasses.asdict(plan.partition),
        "partition_file": partition_file.name,
        "partition_digest": digest,
        "num_clients": partition.num_clients,
        "client_sizes": [{"client_id": c.client_id, "dataset": c.dataset, "num_classes": len(c.labels),
                          "num_train": len(c.train), "num_test": len(c.test)} for c in partition.clients],
        "client_classes": plan.client_classes,
        "strategy": settings.strategy,
        "strategy_options": settings.strategy_options,
        "failure_tolerance": settings.failure_tolerance,
        "rounds_planned": plan.rounds,
        "local_epochs": plan.local_epochs,
        "fraction": plan.fraction,
        "fraction_evaluate": settings.fraction_evaluate,
        "backend": backend,
        "run_tag": out.parent.name,
        "rounds_resumed": rounds_resumed,
        "trainable_params": learner.num_trainable_parameters(),
        "global_state_params": sum(v.numel() for v in shared.values()),
        "local_state_params": sum(v.numel() for v in local.values()),
        "global_state_bytes": record_bytes(RecordDict({ARRAYS_KEY: initial}))[1],
        "global_keys": sorted(shared),
        "local_keys": sorted(local),
    }
    run_token = saved["run_token"] if saved is not None else uuid.uuid4().hex
    checkpoint = RoundCheckpoint(out / RESUME_FILE, run_fingerprint(settings, digest), run_token)
    recorder = RunRecorder(out, plan, partition, strategy, header, checkpoint=checkpoint)
    run_config = ConfigRecord({**settings.to_run_config(), PARTITION_DIGEST_KEY: digest, RUN_TOKEN_KEY: run_token})
    logger.info("federated run: %d clients, %d rounds of %d local epochs, strategy %s, unset options from %s -> %s",
                partition.num_clients, plan.rounds, plan.local_epochs, settings.strategy, plan.defaults.source, out)
    start_arrays = initial
    if saved is not None:
        start_arrays = ArrayRecord(torch_state_dict=saved["arrays"])
        strategy.load_state_dict(saved["strategy"])
        # Set after loading, because the snapshot contains the offset of the process that saved it.
        strategy.round_offset = rounds_resumed
        recorder.load_state_dict(saved["recorder"])
        # Last, so that the remaining rounds draw from the generators as the uninterrupted run did.
        restore_rng(saved["rng"])
        logger.info("resuming from %s after round %d of %d", checkpoint.path, rounds_resumed, plan.rounds)
    result = strategy.start(
        grid=grid,
        initial_arrays=start_arrays,
        num_rounds=plan.rounds - rounds_resumed,
        timeout=settings.round_timeout,
        train_config=run_config,
        evaluate_config=ConfigRecord(dict(run_config)),
        evaluate_fn=recorder,
    )
    return recorder.finish(result.arrays if result.arrays is not None else start_arrays)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run`` entry point: the settings come from ``[tool.flwr.app.config]`` and ``--run-config``."""
    disable_telemetry()
    run_server(grid, FederatedSettings.from_run_config(context.run_config), backend="flwr-run")


def make_server_app(settings: FederatedSettings, backend: str, results: dict[str, Any]) -> ServerApp:
    """Build a ServerApp bound to ``settings`` for the in-process simulation; it fills ``results``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        results.update(run_server(grid, settings, backend=backend))

    return app


# ---------------------------------------------------------------------------------------------
# One-machine simulation (run_benchmark.py federated)


@dataclass(frozen=True)
class SimulationOptions:
    """Options of the one-machine simulation of ``run_benchmark.py federated``.

    Attributes:
        backend: ``ray``: Flower's Simulation Runtime (``flwr.simulation.run_simulation``) with
            its Ray backend. ``inprocess``: a fallback that calls the ClientApp in this process,
            one client after the other, without Ray (see :mod:`strategies.fl_inprocess`).
        client_cpus / client_gpus: Ray resources of one client; ``ray_cpus // client_cpus``
            clients run at once, each actor holding one copy of the backbone.
        ray_cpus: CPUs Ray may use (default: all).
        object_store_mb: Size of Ray's object store in MiB.
    """

    backend: str = "ray"
    client_cpus: int = 2
    client_gpus: float = 0.0
    ray_cpus: int | None = None
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        if self.backend not in ("ray", "inprocess"):
            raise ValueError(f"--backend must be 'ray' or 'inprocess', got {self.backend!r}")
        if self.client_cpus < 1 or self.client_gpus < 0:
            raise ValueError(f"client resources must be >= 1 CPU and >= 0 GPUs, got {self.client_cpus} and {self.client_gpus}")
        if self.backend == "ray" and self.total_cpus < self.client_cpus:
            raise ValueError(
                f"Ray may use {self.total_cpus} CPUs, fewer than --client-cpus {self.client_cpus}, so no client could "
                "start; lower --client-cpus or raise --ray-cpus"
            )
        if self.object_store_mb < 80:
            raise ValueError(f"--ray-object-store-mb must be at least 80 (Ray's minimum is 75 MiB), got {self.object_store_mb}")

    @property
    def total_cpus(self) -> int:
        """CPUs given to Ray: ``ray_cpus``, else every CPU of the machine."""
        return self.ray_cpus or os.cpu_count() or 1

    def backend_config(self) -> dict[str, dict[str, Any]]:
        """``backend_config`` of ``run_simulation``: bounded object store, no log forwarding."""
        init_args: dict[str, Any] = {
            "num_cpus": self.total_cpus,
            "log_to_driver": False,
            "object_store_memory": self.object_store_mb * 1024 * 1024,
            "include_dashboard": False,
        }
        return {
            "client_resources": {"num_cpus": self.client_cpus, "num_gpus": self.client_gpus},
            "init_args": init_args,
        }


def run_federated(settings: FederatedSettings, simulation: SimulationOptions | None = None) -> dict[str, Any]:
    """Run one federation on this machine and return its ``results.json`` payload.

    The backbone weights (and the ``digits`` pre-training) are prepared here first, so that
    simulated clients only read the cached file. Unless ``settings`` name a
    ``client_state_dir``, the clients keep their local state in ``client_state`` inside the
    run folder while the run is incomplete, so that ``resume`` restores it.

    Raises:
        ValueError: ``resume`` is set and the run folder's checkpoint was saved with other settings.
    """
    simulation = simulation or SimulationOptions()
    disable_telemetry()
    plan = resolve_plan(settings)
    federated_backbone(settings)
    partition = load_partition(plan)
    logger.info("method %s, config %s", settings.method, config_to_dict(plan.method_config))
    if settings.resume and simulation.backend == "ray":
        # run_server checks it as well, but under Ray its error would only reach the log.
        read_resume_checkpoint(settings)
    client_dir = None
    if not settings.client_state_dir:
        client_dir = (run_dir(plan, partition.num_clients) / CLIENT_STATE_DIR).absolute()
        settings = dataclasses.replace(settings, client_state_dir=str(client_dir))
        if not settings.resume:
            shutil.rmtree(client_dir, ignore_errors=True)
    results = _simulate(settings, simulation, partition.num_clients)
    if client_dir is not None:
        shutil.rmtree(client_dir, ignore_errors=True)
    return results


def _simulate(settings: FederatedSettings, simulation: SimulationOptions, num_clients: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if simulation.backend == "inprocess":
        from .fl_inprocess import InProcessGrid

        grid = InProcessGrid(client_app, num_clients)
        results.update(run_server(grid, settings, backend="inprocess"))
        return results

    from flwr.simulation import run_simulation

    # NOTE: run_simulation is deprecated since flwr 1.28 (still present in 1.42) in favour of
    # `flwr run`; it is the only in-process route to the Simulation Runtime.
    run_simulation(
        server_app=make_server_app(settings, "ray", results),
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config=simulation.backend_config(),
    )
    if not results.get("complete"):
        raise RuntimeError(f"the simulation ended without complete results; see the log above and {Path(settings.output_dir)}")
    return results

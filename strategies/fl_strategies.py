"""Flower strategies chosen by name, with per-round bookkeeping and a failure tolerance.

Every strategy that Flower ships for the Message API and that averages an ``ArrayRecord``
(FedAvg and its variants, the FedOpt family, the robust aggregators, q-FedAvg) can drive a run.
:func:`build_strategy` subclasses the chosen class with :class:`RoundBookkeeping`, which records
what each round sent and received, which clients replied with what, which failed, and skips the
aggregation of a round where more clients failed than the tolerance allows.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from .federated import LOCAL_ACCURACY_KEY, NUM_EXAMPLES_KEY, PARTITION_ID_KEY, TRAIN_LOSS_KEY

logger = logging.getLogger(__name__)

STRATEGIES: dict[str, type[FedAvg]] = {
    cls.__name__.lower(): cls
    for cls in (FedAvg, FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum, MultiKrum,
                Bulyan, QFedAvg)
}
"""Strategy name on the command line -> Flower class (``flwr.serverapp.strategy``)."""

# Arguments that the run sets from its own options; --strategy-option may not change them.
_MANAGED_ARGUMENTS = frozenset({
    "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
    "weighted_by_key", "arrayrecord_key", "configrecord_key", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn",
    "train_loss_key",
})

TIMEOUT_REASON = "no reply before the round timeout"


def record_bytes(content: RecordDict) -> tuple[int, int]:
    """Bytes of a message's content: (all records, ArrayRecords only), as Flower counts them."""
    total = arrays = 0
    for record in content.values():
        size = record.count_bytes()
        total += size
        if isinstance(record, ArrayRecord):
            arrays += size
    return total, arrays


def new_round_record() -> dict[str, Any]:
    """Empty bookkeeping of one round."""
    return {
        "train_sampled": [],
        "evaluate_sampled": [],
        "bytes_sent": 0,
        "bytes_received": 0,
        "array_bytes_sent": 0,
        "array_bytes_received": 0,
        "train_replies": [],
        "evaluate_replies": [],
        "failures": [],
        "aggregated": None,
    }


class RoundBookkeeping:
    """Mixin placed before a Flower strategy class in the MRO (see :func:`build_strategy`).

    Every hook adds ``round_offset`` to the round number that ``Strategy.start`` passes, so a
    run resumed after round N that starts Flower's loop at 1 sends, records and aggregates the
    true rounds N + 1, N + 2...

    Attributes:
        failure_tolerance: Largest fraction of the sampled clients that may fail (raise, or not
            reply before the timeout) in a round whose replies are still aggregated.
        round_records: Round -> traffic, per-client replies and failures of that round.
        node_partitions: Flower node id -> partition id, learned from the replies.
        sampler: Random generator of the client sampling, seeded with the run seed.
        round_offset: Rounds finished before ``Strategy.start`` was called (0 unless resumed).
    """

    failure_tolerance: float = 0.5
    round_offset: int = 0

    def init_bookkeeping(self, failure_tolerance: float, seed: int) -> None:
        self.failure_tolerance = failure_tolerance
        self.round_records: dict[int, dict[str, Any]] = {}
        self.node_partitions: dict[int, int] = {}
        self.sampler = random.Random(seed)
        self.round_offset = 0

    def round_record(self, server_round: int) -> dict[str, Any]:
        return self.round_records.setdefault(server_round, new_round_record())

    # -- state of a resumable run -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return every instance attribute that is not a function: the options, the bookkeeping,
        the sampler and the state the Flower class keeps between rounds. In flwr 1.42 that is
        FedAvgM's ``momentum_vector`` and ``current_arrays``, the FedOpt family's ``m_t``, ``v_t``
        and ``current_arrays``, and q-FedAvg's ``current_arrays``.

        The values are the live objects; pickle the snapshot (``torch.save``) to copy it.
        """
        return {name: value for name, value in vars(self).items() if not callable(value)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot into a strategy built with the same options.

        Raises:
            ValueError: The snapshot's attributes differ from this strategy's, so it was taken
                from another strategy class or another flwr version.
        """
        own = set(self.state_dict())
        if set(state) != own:
            raise ValueError(
                f"the saved strategy state does not fit {type(self).__name__}: attributes only in the checkpoint "
                f"{sorted(set(state) - own)}, only in this strategy {sorted(own - set(state))}"
            )
        vars(self).update(state)

    def _sample_with_own_rng(self, configure: Callable[..., Iterable[Message]], *args: Any) -> list[Message]:
        """Call a Flower ``configure_*`` method with ``random`` drawing from ``sampler``.

        Flower samples nodes with the module-level ``random``, which the learners reseed
        whenever they are built, so without this every round would sample the same clients.
        """
        outer = random.getstate()
        random.setstate(self.sampler.getstate())
        try:
            return list(configure(*args))
        finally:
            self.sampler.setstate(random.getstate())
            random.setstate(outer)

    # -- training ---------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self._sample_with_own_rng(super().configure_train, server_round, arrays, config, grid)  # type: ignore[misc]
        return self._record_sent(server_round, "train", messages)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        record = self.round_record(server_round)
        sampled = record["train_sampled"]
        valid = self._collect(record, "train", sampled, replies)
        failed = len(sampled) - len(valid)
        if not valid or failed > self.failure_tolerance * len(sampled):
            logger.error(
                "round %d: %d of %d clients failed, more than the failure tolerance %.2f allows; the global "
                "state is kept from the previous round",
                server_round, failed, len(sampled), self.failure_tolerance,
            )
            record["aggregated"] = False
            return None, None
        if failed:
            logger.warning("round %d: %d of %d clients failed; aggregating the other %d",
                           server_round, failed, len(sampled), len(valid))
        record["aggregated"] = True
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    # -- evaluation -------------------------------------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self._sample_with_own_rng(super().configure_evaluate, server_round, arrays, config, grid)  # type: ignore[misc]
        return self._record_sent(server_round, "evaluate", messages)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        record = self.round_record(server_round)
        self._collect(record, "evaluate", record["evaluate_sampled"], replies)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]

    # -- helpers ----------------------------------------------------------------------------

    def _record_sent(self, server_round: int, phase: str, messages: Iterable[Message]) -> list[Message]:
        """Store the sampled nodes of ``phase`` and count the bytes of its messages."""
        messages = list(messages)
        record = self.round_record(server_round)
        record[f"{phase}_sampled"] = [m.metadata.dst_node_id for m in messages]
        for message in messages:
            total, arrays = record_bytes(message.content)
            record["bytes_sent"] += total
            record["array_bytes_sent"] += arrays
        return messages

    def _collect(self, record: dict[str, Any], phase: str, sampled: list[int], replies: list[Message]) -> list[Message]:
        """Count received bytes, store each reply's metrics and each failure; return the valid replies."""
        valid = []
        replied = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            replied.add(node)
            if reply.has_error():
                self._add_failure(record, phase, node, str(reply.error.reason))
                continue
            total, arrays = record_bytes(reply.content)
            record["bytes_received"] += total
            record["array_bytes_received"] += arrays
            metrics = dict(next(iter(reply.content.metric_records.values())))
            if PARTITION_ID_KEY in metrics:
                self.node_partitions[node] = int(metrics[PARTITION_ID_KEY])
            record[f"{phase}_replies"].append({"node_id": node, **metrics})
            valid.append(reply)
        for node in sampled:
            if node not in replied:
                self._add_failure(record, phase, node, TIMEOUT_REASON)
        return valid

    def _add_failure(self, record: dict[str, Any], phase: str, node: int, reason: str) -> None:
        partition = self.node_partitions.get(node)
        logger.error("%s on node %d (partition %s) failed: %s", phase, node,
                     partition if partition is not None else "unknown", reason.strip().splitlines()[-1] if reason.strip() else reason)
        record["failures"].append({"phase": phase, "node_id": node, "partition_id": partition, "reason": reason})


def train_metrics_mean(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean of every scalar train metric (the partition id left out)."""
    weights = [float(_metrics(r)[weighted_by_key]) for r in records]
    total = sum(weights) or 1.0
    result = MetricRecord()
    for key in _metrics(records[0]):
        if key in (weighted_by_key, PARTITION_ID_KEY) or isinstance(_metrics(records[0])[key], list):
            continue
        result[key] = sum(float(_metrics(r)[key]) * w for r, w in zip(records, weights)) / total
    result[NUM_EXAMPLES_KEY] = int(sum(weights))
    return result


def evaluate_metrics_mean(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Local accuracy: the mean over clients (FedOTP's personalized accuracy) and the
    test-image-weighted mean; clients without test images are left out of both."""
    pairs = [(float(_metrics(r)[LOCAL_ACCURACY_KEY]), float(_metrics(r)[weighted_by_key])) for r in records]
    pairs = [(accuracy, weight) for accuracy, weight in pairs if weight > 0 and math.isfinite(accuracy)]
    result = MetricRecord()
    if pairs:
        result[f"{LOCAL_ACCURACY_KEY}-mean"] = sum(a for a, _ in pairs) / len(pairs)
        result[f"{LOCAL_ACCURACY_KEY}-weighted"] = sum(a * w for a, w in pairs) / sum(w for _, w in pairs)
    result[NUM_EXAMPLES_KEY] = int(sum(w for _, w in pairs))
    return result


def _metrics(record: RecordDict) -> MetricRecord:
    return next(iter(record.metric_records.values()))


def parse_strategy_options(cls: type, text: str) -> dict[str, Any]:
    """``"proximal_mu=0.01 eta=0.1"`` -> keyword arguments of ``cls``, typed by their defaults.

    Raises:
        ValueError: A malformed pair, an argument ``cls`` does not take, one the run manages
            itself, or a value of the wrong type.
    """
    parameters = {
        name: p for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    options: dict[str, Any] = {}
    for pair in text.split():
        if "=" not in pair:
            raise ValueError(f"--strategy-option expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in _MANAGED_ARGUMENTS:
            raise ValueError(f"{key} is set from the run's own options (--fraction, --fraction-evaluate...), not --strategy-option")
        if key not in parameters:
            valid = sorted(set(parameters) - _MANAGED_ARGUMENTS)
            close = difflib.get_close_matches(key, valid, n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{cls.__name__} has no option {key!r}.{hint} Options: {', '.join(valid)}")
        options[key] = _typed(key, value, parameters[key].default)
    return options


def _typed(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"strategy option {key} expects true or false, got {value!r}")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"strategy option {key} expects a {kind.__name__}, got {value!r}") from None
    if default is inspect.Parameter.empty or default is None:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def build_strategy(name: str, *, num_clients: int, fraction_train: float, fraction_evaluate: float,
                   failure_tolerance: float, options: str = "", client_lr: float = 0.001, seed: int = 0) -> Strategy:
    """Build the Flower strategy ``name`` with :class:`RoundBookkeeping`, weighting by ``num-examples``.

    Args:
        name: Key of `STRATEGIES` (case-insensitive).
        num_clients: Clients in the federation; the server waits until all are connected.
        fraction_train / fraction_evaluate: Fractions of clients sampled per round (at least
            one when the fraction is above 0).
        failure_tolerance: See :class:`RoundBookkeeping`.
        options: Extra constructor arguments as ``key=value`` pairs (``proximal_mu=0.01``).
        client_lr: The clients' learning rate, which q-FedAvg needs.
        seed: Seed of the client sampling.

    Raises:
        ValueError: An unknown strategy or option.
    """
    key = name.lower()
    if key not in STRATEGIES:
        close = difflib.get_close_matches(key, list(STRATEGIES), n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown strategy {name!r}.{hint} Strategies: {', '.join(STRATEGIES)}")
    base = STRATEGIES[key]
    kwargs: dict[str, Any] = {
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if fraction_evaluate > 0 else 0,
        "min_available_nodes": num_clients,
        "weighted_by_key": NUM_EXAMPLES_KEY,
        "train_metrics_aggr_fn": train_metrics_mean,
        "evaluate_metrics_aggr_fn": evaluate_metrics_mean,
    }
    if base is QFedAvg:
        kwargs.update(client_learning_rate=client_lr, train_loss_key=TRAIN_LOSS_KEY)
    kwargs.update(parse_strategy_options(base, options))
    tracked = type(f"Tracked{base.__name__}", (RoundBookkeeping, base), {"__module__": __name__})
    strategy = tracked(**kwargs)
    strategy.init_bookkeeping(failure_tolerance, seed)
    return strategy

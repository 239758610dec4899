"""Per-round metrics of a federated run, written as ``results.json``, ``rounds.csv`` and ``rounds.png``.

:class:`RunRecorder` is the ``evaluate_fn`` of ``Strategy.start``: Flower calls it once before
the first round and after every round, when the round's training and client evaluation are done.
It evaluates the global state on the server, joins the strategy's bookkeeping of the round
(traffic, per-client loss and accuracy, failures) and rewrites the files, so an interrupted run
leaves every finished round on disk with ``complete: false``. It then writes the round
checkpoint that ``--resume`` continues from.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord, MetricRecord

from benchmarks.partitions import FederatedPartition
from learners.config import config_to_dict
from learners.io import atomic_write, save_torch, write_json

from .experiment import RESULTS_SCHEMA, peak_memory
from .federated import (
    LOCAL_ACCURACY_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    PROTOCOL,
    TRAIN_LOSS_KEY,
    FederatedPlan,
    evaluate_global,
)
from .fl_resume import RoundCheckpoint
from .fl_strategies import RoundBookkeeping

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("global_accuracy", "base_accuracy", "novel_accuracy", "hm", "hm_local_base_novel",
                   "local_accuracy_mean")
CSV_COLUMNS = (
    "round", "clients_sampled", "clients_succeeded", "clients_failed", "evaluate_failed", "aggregated",
    "bytes_sent", "bytes_received", "array_bytes_sent", "array_bytes_received", "train_loss",
    *SUMMARY_METRICS, "seconds",
)


def harmonic_mean_of(values: list[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (FedTPG's 3-way HM of Local, Base and New)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


class RunRecorder:
    """Collects one row per round and writes the run's result files.

    Args:
        out: The run folder.
        plan: The resolved run.
        partition: The federation.
        strategy: The strategy, whose :class:`RoundBookkeeping` records the traffic.
        header: Fixed fields of ``results.json`` (method, partition, parameter counts...).
        checkpoint: Where to save the state after each round, or None to save none.
    """

    def __init__(self, out: Path, plan: FederatedPlan, partition: FederatedPartition, strategy: RoundBookkeeping,
                 header: dict[str, Any], checkpoint: RoundCheckpoint | None = None) -> None:
        self.out = out
        self.plan = plan
        self.partition = partition
        self.strategy = strategy
        self.header = header
        self.checkpoint = checkpoint
        self.initial: dict[str, Any] | None = None
        self.rounds: list[dict[str, Any]] = []
        self.seconds_before = 0.0
        self.started = time.perf_counter()
        self._last_time = self.started

    # -- Flower's evaluate_fn ---------------------------------------------------------------

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and self.strategy.round_offset > 0:
            # Strategy.start evaluates its initial arrays first. After a resume they are the state
            # after the saved round, whose row already contains that evaluation.
            logger.info("resumed after round %d/%d; round 0 keeps its saved evaluation",
                        self.strategy.round_offset, self.plan.rounds)
            return None
        server_round += self.strategy.round_offset
        evaluate = server_round == 0 or server_round == self.plan.rounds or server_round % self.plan.settings.eval_every == 0
        global_metrics = evaluate_global(self.plan, self.partition, arrays.to_torch_state_dict()) if evaluate else None
        if server_round == 0:
            self.initial = global_metrics
            logger.info("round 0 (initial global state): global accuracy %.2f", global_metrics["global_accuracy"])
        else:
            row = self._round_row(server_round, global_metrics)
            self.rounds.append(row)
            self._log_round(row)
            self.write(complete=False)
            if self.checkpoint is not None:
                self.checkpoint.save(server_round, arrays.to_torch_state_dict(), self.state_dict(),
                                     self.strategy.state_dict())
        if global_metrics is None:
            return None
        return MetricRecord({k.replace("_", "-"): float(v) for k, v in global_metrics.items() if k != "per_dataset"})

    def _round_row(self, server_round: int, global_metrics: dict[str, Any] | None) -> dict[str, Any]:
        record = self.strategy.round_records.get(server_round, {})
        now = time.perf_counter()
        train = record.get("train_replies", [])
        evaluations = record.get("evaluate_replies", [])
        failures = record.get("failures", [])
        row: dict[str, Any] = {
            "round": server_round,
            "clients_sampled": len(record.get("train_sampled", [])),
            "clients_succeeded": len(train),
            "clients_failed": sum(1 for f in failures if f["phase"] == "train"),
            "evaluate_failed": sum(1 for f in failures if f["phase"] == "evaluate"),
            "failures": failures,
            "aggregated": bool(record.get("aggregated")),
            "bytes_sent": record.get("bytes_sent", 0),
            "bytes_received": record.get("bytes_received", 0),
            "array_bytes_sent": record.get("array_bytes_sent", 0),
            "array_bytes_received": record.get("array_bytes_received", 0),
            "seconds": now - self._last_time,
        }
        self._last_time = now

        weights = [float(r[NUM_EXAMPLES_KEY]) for r in train]
        row["train_loss"] = (sum(float(r[TRAIN_LOSS_KEY]) * w for r, w in zip(train, weights)) / sum(weights)
                             if train and sum(weights) > 0 else None)
        row["train_loss_per_client"] = {str(int(r[PARTITION_ID_KEY])): float(r[TRAIN_LOSS_KEY]) for r in train}
        term_keys = sorted({k for r in train for k in r if k.startswith("term-")})
        row["train_terms"] = {
            k[len("term-"):]: sum(float(r[k]) * w for r, w in zip(train, weights)) / sum(weights)
            for k in term_keys if sum(weights) > 0
        }

        per_client = {
            str(int(r[PARTITION_ID_KEY])): float(r[LOCAL_ACCURACY_KEY])
            for r in evaluations if float(r[NUM_EXAMPLES_KEY]) > 0
        }
        row["local_accuracy_per_client"] = per_client
        row["local_accuracy_mean"] = sum(per_client.values()) / len(per_client) if per_client else None

        for key in ("global_accuracy", "base_accuracy", "novel_accuracy", "hm", "hm_local_base_novel"):
            row[key] = None
        row["per_dataset"] = None
        if global_metrics is not None:
            row.update({k: v for k, v in global_metrics.items()})
            if "base_accuracy" in global_metrics and row["local_accuracy_mean"] is not None:
                row["hm_local_base_novel"] = harmonic_mean_of(
                    [row["local_accuracy_mean"], global_metrics["base_accuracy"], global_metrics["novel_accuracy"]]
                )
        return row

    def _log_round(self, row: dict[str, Any]) -> None:
        parts = [f"round {row['round']}/{self.plan.rounds}"]
        for key in ("train_loss", "global_accuracy", "base_accuracy", "novel_accuracy", "hm", "local_accuracy_mean"):
            if row.get(key) is not None:
                parts.append(f"{key} {row[key]:.4g}")
        parts.append(f"sent {row['bytes_sent']} B, received {row['bytes_received']} B")
        if row["clients_failed"] or row["evaluate_failed"]:
            parts.append(f"failed: {row['clients_failed']} train, {row['evaluate_failed']} evaluate")
        logger.info("%s", ", ".join(parts))

    # -- state of a resumable run -----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return what a resumed run needs: the initial evaluation, the round rows and the seconds so far."""
        return {"initial": self.initial, "rounds": self.rounds, "seconds": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of an interrupted run."""
        self.initial = state["initial"]
        self.rounds = list(state["rounds"])
        self.seconds_before = float(state["seconds"])

    def elapsed(self) -> float:
        """Seconds of the run, including those of the processes it was resumed from."""
        return self.seconds_before + time.perf_counter() - self.started

    # -- files ------------------------------------------------------------------------------

    def results(self, complete: bool) -> dict[str, Any]:
        """Build the ``results.json`` payload, whose summary values come from the last round."""
        last = self.rounds[-1] if self.rounds else {}
        memory, memory_kind = peak_memory()
        results: dict[str, Any] = {
            "schema": RESULTS_SCHEMA,
            "complete": complete,
            "protocol": PROTOCOL,
            **self.header,
            "rounds_completed": len(self.rounds),
            # The last round's values, never the best round's.
            **{key: last.get(key) for key in SUMMARY_METRICS},
            "per_dataset": last.get("per_dataset"),
            "initial": self.initial,
            "rounds": self.rounds,
            "clients_failed_total": sum(r["clients_failed"] for r in self.rounds),
            "rounds_not_aggregated": [r["round"] for r in self.rounds if not r["aggregated"]],
            "bytes_sent_total": sum(r["bytes_sent"] for r in self.rounds),
            "bytes_received_total": sum(r["bytes_received"] for r in self.rounds),
            "seconds": self.elapsed(),
            "server_peak_memory_bytes": memory,
            "server_peak_memory_kind": memory_kind,
            "config": {
                "method": config_to_dict(self.plan.method_config),
                "train": config_to_dict(self.plan.train_config),
                "federated": self.plan.settings.to_run_config(),
                "protocol_defaults": self.plan.defaults.source,
            },
            "torch_version": torch.__version__,
            "flwr_version": flwr.__version__,
        }
        return results

    def write(self, complete: bool) -> dict[str, Any]:
        """Write ``results.json`` and ``rounds.csv`` (and ``rounds.png`` once complete)."""
        results = self.results(complete)
        write_json(self.out / "results.json", results)
        atomic_write(self.out / "rounds.csv", lambda handle: handle.write(self.csv_text()))
        if complete:
            self.plot(self.out / "rounds.png")
        return results

    def finish(self, final_arrays: ArrayRecord) -> dict[str, Any]:
        """Save the final global state, write the complete result files and delete the round checkpoint."""
        save_torch(self.out / "global_state.pt", {"state": final_arrays.to_torch_state_dict(), **self.header})
        results = self.write(complete=True)
        if self.checkpoint is not None:
            self.checkpoint.remove()
        logger.info(
            "%s %s: last round global accuracy %s, local accuracy mean %s -> %s",
            self.plan.settings.method, self.plan.settings.dataset,
            _fmt(results["global_accuracy"]), _fmt(results["local_accuracy_mean"]), self.out / "results.json",
        )
        return results

    def csv_text(self) -> str:
        """Format one CSV row per round, with per-client accuracies and losses in ``*_client<i>`` columns."""
        clients = range(self.partition.num_clients)
        columns = [*CSV_COLUMNS, *(f"local_accuracy_client{i}" for i in clients), *(f"train_loss_client{i}" for i in clients)]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rounds:
            flat = {k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS}
            for i in clients:
                flat[f"local_accuracy_client{i}"] = row["local_accuracy_per_client"].get(str(i), "")
                flat[f"train_loss_client{i}"] = row["train_loss_per_client"].get(str(i), "")
            writer.writerow(flat)
        return buffer.getvalue()

    def plot(self, path: Path) -> None:
        """Accuracy, training loss and traffic per round as one PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        figure, (accuracy_axis, loss_axis, bytes_axis) = plt.subplots(1, 3, figsize=(15, 4))
        for key, label in (("global_accuracy", "global"), ("base_accuracy", "base"), ("novel_accuracy", "novel"),
                           ("hm", "HM"), ("local_accuracy_mean", "local (mean over clients)")):
            points = [(r["round"], r[key]) for r in self.rounds if r.get(key) is not None]
            if points:
                accuracy_axis.plot(*zip(*points), marker="o", label=label)
        accuracy_axis.set(xlabel="round", ylabel="accuracy (%)", title="accuracy")
        accuracy_axis.legend(fontsize="small")
        losses = [(r["round"], r["train_loss"]) for r in self.rounds if r.get("train_loss") is not None]
        if losses:
            loss_axis.plot(*zip(*losses), marker="o")
        loss_axis.set(xlabel="round", ylabel="loss", title="training loss (example-weighted mean)")
        bytes_axis.plot(rounds, [r["bytes_sent"] / 1024 for r in self.rounds], marker="o", label="sent")
        bytes_axis.plot(rounds, [r["bytes_received"] / 1024 for r in self.rounds], marker="o", label="received")
        bytes_axis.set(xlabel="round", ylabel="KiB", title="server traffic per round")
        bytes_axis.legend(fontsize="small")
        figure.suptitle(f"{self.plan.settings.method} on {self.plan.settings.dataset}, "
                        f"{self.plan.settings.partition}, {self.plan.settings.strategy}")
        figure.tight_layout()
        atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100), mode="wb")
        plt.close(figure)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"

"""Summary of federated runs: final-round accuracies over seeds, traffic and time, and curves per round.

Runs are grouped by federation (datasets), method and run folder tag, which names the partition,
client count, sampled fraction, strategy, shots, rounds and local epochs. Each row gives the
mean and sample standard deviation over seeds of the last round's accuracies (never the best
round's) and the mean cost. ``plots/rounds.png`` draws the mean global and local accuracy of
every group against the round.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._io import write_json_atomic, write_text_atomic
from .summary import finite_number, format_cell, load_results, mean_std, rows_to_csv

PROTOCOL = "federated"
METRICS = ("global_accuracy", "base_accuracy", "novel_accuracy", "hm", "local_accuracy_mean", "hm_local_base_novel")
COST_FIELDS = ("trainable_params", "global_state_params", "rounds_completed", "bytes_sent_total",
               "bytes_received_total", "seconds", "clients_failed_total", "server_peak_memory_bytes")
_LABELS = {"global_accuracy": "global", "base_accuracy": "base", "novel_accuracy": "novel", "hm": "HM",
           "local_accuracy_mean": "local", "hm_local_base_novel": "HM(local, base, novel)"}


def _tag(result: dict[str, Any]) -> str:
    """Return the run folder level between the method and the seed (``dirichlet-a0.3-c10-fedavg-s16-r10e1``).

    Results files written before ``run_tag`` was recorded get a tag built from their fields.
    """
    if result.get("run_tag"):
        return str(result["run_tag"])
    return (f"{result.get('partition')}-c{result.get('num_clients')}-{result.get('strategy')}"
            f"-s{result.get('shots')}-r{result.get('rounds_planned')}e{result.get('local_epochs')}")


def summarize_federated(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Group runs by (datasets, method, folder tag) and average the last round over seeds.

    Returns:
        ``{"protocol", "metrics", "rows"}``. Each row has the group fields, ``seeds``, each metric
        and its ``_std`` (None where no run reports it), the mean cost fields and
        ``rounds``: the per-round means of global and local accuracy, for the plot.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[(result["dataset"], result["method"], _tag(result))].append(result)
    rows = []
    for (dataset, method, tag), runs in sorted(groups.items()):
        first = runs[0]
        row: dict[str, Any] = {
            "dataset": dataset,
            "method": method,
            "run": tag,
            "partition": first.get("partition"),
            "strategy": first.get("strategy"),
            "num_clients": first.get("num_clients"),
            "model": first.get("model"),
            "seeds": sorted(r["seed"] for r in runs),
        }
        for metric in METRICS:
            values = [v for v in (finite_number(r.get(metric)) for r in runs) if v is not None]
            row[metric], row[f"{metric}_std"] = mean_std(values) if values else (None, None)
        for cost in COST_FIELDS:
            values = [v for v in (finite_number(r.get(cost)) for r in runs) if v is not None]
            row[cost] = statistics.fmean(values) if values else None
        row["rounds"] = _round_means(runs)
        rows.append(row)
    return {"protocol": PROTOCOL, "metrics": list(METRICS), "rows": rows}


def _round_means(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds of each round's global and local accuracy (rounds without a value are skipped)."""
    by_round: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for record in run.get("rounds", []):
            for key in ("global_accuracy", "local_accuracy_mean"):
                value = finite_number(record.get(key))
                if value is not None:
                    by_round[int(record["round"])][key].append(value)
    return [
        {"round": number, **{key: statistics.fmean(values) for key, values in sorted(metrics.items())}}
        for number, metrics in sorted(by_round.items())
    ]


def to_markdown(summary: dict[str, Any]) -> str:
    """Format the summary as one Markdown table, accuracies as mean ± standard deviation."""
    header = ["datasets", "method", "run", "seeds", *(_LABELS[m] for m in METRICS), "rounds", "MiB sent",
              "MiB received", "seconds", "failed clients (mean)"]
    lines = ["# federated summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        cells = [row["dataset"], row["method"], row["run"], ",".join(str(s) for s in row["seeds"])]
        for metric in METRICS:
            std = row.get(f"{metric}_std")
            cells.append(format_cell(row[metric]) + (f" ± {format_cell(std)}" if std else ""))
        sent, received = row.get("bytes_sent_total"), row.get("bytes_received_total")
        cells += [format_cell(row.get("rounds_completed"), 0), format_cell(sent / 2**20 if sent is not None else None),
                  format_cell(received / 2**20 if received is not None else None), format_cell(row.get("seconds"), 1),
                  format_cell(row.get("clients_failed_total"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies are those of the last round, never the best round's. global: the global prompt "
              "on each dataset's test set over all its classes (mean over datasets); base and novel: on the "
              "base and novel halves (base2novel partitions); local: mean over clients of each client's "
              "accuracy with its local state on its own test set.", ""]
    return "\n".join(lines) + "\n"


def to_csv(summary: dict[str, Any]) -> str:
    """Format one CSV row per group, without the per-round lists; seeds are joined with ';'."""
    return rows_to_csv([{k: v for k, v in row.items() if k != "rounds"} for row in summary["rows"]])


def plot_rounds(summary: dict[str, Any], path: Path) -> Path:
    """Draw the mean global and local accuracy of every group against the round into ``path``."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    panels = {"global_accuracy": figure.add_subplot(1, 2, 1), "local_accuracy_mean": figure.add_subplot(1, 2, 2)}
    for row in summary["rows"]:
        label = f"{row['method']} {row['dataset']} {row['run']}"
        for key, axes in panels.items():
            points = [(r["round"], r[key]) for r in row["rounds"] if key in r]
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=label)
    for key, axes in panels.items():
        axes.set_xlabel("round")
        axes.set_ylabel("accuracy (%)")
        axes.set_title(f"{_LABELS[key]} accuracy, mean over seeds")
    panels["global_accuracy"].legend(fontsize="x-small")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def write_federated_summary(output_dir: str | os.PathLike) -> list[Path]:
    """Rebuild ``OUTPUT/federated/summary.{json,md,csv}`` and ``plots/rounds.png`` from the results files."""
    root = Path(output_dir) / PROTOCOL
    summary = summarize_federated(load_results(output_dir, PROTOCOL))
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / "summary.json", root / "summary.md", root / "summary.csv"]
    write_json_atomic(paths[0], summary)
    write_text_atomic(paths[1], to_markdown(summary))
    write_text_atomic(paths[2], to_csv(summary))
    if summary["rows"]:
        paths.append(plot_rounds(summary, root / "plots" / "rounds.png"))
    return paths

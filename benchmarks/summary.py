"""Summaries built from ``results.json`` files (never from logs): JSON, Markdown and CSV.

Per (method, dataset): mean and sample standard deviation over seeds. Per method: the average
over datasets the way the papers compute it; for base-to-novel the HM of the *averaged* base and
novel accuracies, not the mean of per-dataset HMs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ._io import write_json_atomic

logger = logging.getLogger(__name__)

COST_FIELDS = ("trainable_params", "train_seconds_per_epoch", "eval_images_per_second", "peak_memory_bytes")
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "base2novel": ("base_accuracy", "novel_accuracy", "harmonic_mean"),
}


def harmonic_mean(a: float, b: float) -> float:
    """HM of two accuracies; 0 when both are 0."""
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load_results(output_dir: str | os.PathLike, protocol: str) -> list[dict[str, Any]]:
    """Every complete ``results.json`` under ``output_dir/protocol``."""
    root = Path(output_dir) / protocol
    results = []
    for path in sorted(root.glob("**/results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            logger.warning("skipping unreadable results file %s: %s", path, error)
            continue
        if data.get("complete") and data.get("protocol") == protocol:
            results.append(data)
    return results


def summarize(results: list[dict[str, Any]], protocol: str) -> dict[str, Any]:
    """Aggregate results over seeds, then over datasets."""
    metrics = PROTOCOL_METRICS.get(protocol, ("accuracy",))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[(result["method"], result["dataset"])].append(result)

    rows = []
    for (method, dataset), runs in sorted(groups.items()):
        row: dict[str, Any] = {"method": method, "dataset": dataset, "seeds": sorted(r["seed"] for r in runs)}
        for metric in metrics:
            if metric == "harmonic_mean" and protocol == "base2novel":
                continue
            row[metric], row[f"{metric}_std"] = mean_std(r[metric] for r in runs if metric in r)
        if protocol == "base2novel":
            row["harmonic_mean"] = harmonic_mean(row["base_accuracy"], row["novel_accuracy"])
            row["harmonic_mean_std"] = mean_std(r["harmonic_mean"] for r in runs)[1]
        for cost in COST_FIELDS:
            values = [r[cost] for r in runs if isinstance(r.get(cost), (int, float))]
            row[cost] = statistics.fmean(values) if values else None
        rows.append(row)

    averages = []
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    for method, method_rows in sorted(by_method.items()):
        average: dict[str, Any] = {"method": method, "dataset": "average", "datasets": [r["dataset"] for r in method_rows]}
        for metric in metrics:
            if metric == "harmonic_mean" and protocol == "base2novel":
                continue
            average[metric] = statistics.fmean(r[metric] for r in method_rows)
        if protocol == "base2novel":
            average["harmonic_mean"] = harmonic_mean(average["base_accuracy"], average["novel_accuracy"])
        for cost in COST_FIELDS:
            values = [r[cost] for r in method_rows if r[cost] is not None]
            average[cost] = statistics.fmean(values) if values else None
        averages.append(average)
    return {"protocol": protocol, "metrics": list(metrics), "rows": rows, "averages": averages}


def _format(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def to_markdown(summary: dict[str, Any]) -> str:
    metrics = summary["metrics"]
    header = ["method", "dataset", "seeds", *metrics, "trainable params", "train s/epoch", "eval img/s", "peak memory (MiB)"]
    lines = [f"# {summary['protocol']} summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"] + summary["averages"]:
        cells = [row["method"], row["dataset"], ",".join(str(s) for s in row.get("seeds", [])) or "-"]
        for metric in metrics:
            std = row.get(f"{metric}_std")
            cells.append(_format(row.get(metric)) + (f" ± {_format(std)}" if std is not None and row["dataset"] != "average" else ""))
        memory = row.get("peak_memory_bytes")
        cells += [
            _format(row.get("trainable_params"), 0),
            _format(row.get("train_seconds_per_epoch")),
            _format(row.get("eval_images_per_second"), 1),
            _format(memory / 2**20 if memory else None, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if summary["protocol"] == "base2novel":
        lines.append("The average row's HM is the HM of the averaged base and novel accuracies, as the papers compute it.")
    return "\n".join(lines) + "\n"


def to_csv(summary: dict[str, Any]) -> str:
    rows = summary["rows"] + summary["averages"]
    fields: list[str] = []
    for row in rows:
        for key in row:
            if key not in fields and not isinstance(row[key], list):
                fields.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def write_summary(output_dir: str | os.PathLike, protocol: str) -> list[Path]:
    """Rebuild ``OUTPUT/PROTOCOL/summary.{json,md,csv}`` from the results files."""
    summary = summarize(load_results(output_dir, protocol), protocol)
    root = Path(output_dir) / protocol
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / "summary.json", root / "summary.md", root / "summary.csv"]
    write_json_atomic(paths[0], summary)
    _write_text(paths[1], to_markdown(summary))
    _write_text(paths[2], to_csv(summary))
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

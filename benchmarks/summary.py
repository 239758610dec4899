"""Summaries built from ``results.json`` files (never from logs): JSON, Markdown and CSV.

Per dataset: mean and sample standard deviation over seeds. Per method: the average over
datasets the way the papers compute it:

- base-to-novel: the HM of the *averaged* base and novel accuracies, not the mean of
  per-dataset HMs;
- few-shot: the mean accuracy per shot count;
- transfer protocols: the mean accuracy over the targets.

Every row is set against the published value for the same method, protocol and dataset
(`benchmarks.published`), and every summary lists the cost of each method.
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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._io import write_json_atomic, write_text_atomic
from .datasets import DATASETS
from .published import AVERAGE, PROTOCOL_METRICS, TRANSFER_PROTOCOLS, PublishedTable, load_published

logger = logging.getLogger(__name__)

COST_FIELDS = ("trainable_params", "train_seconds_per_epoch", "eval_images_per_second", "peak_memory_bytes")

_DATASET_ORDER = {name: index for index, name in enumerate(DATASETS)}


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
    """Read every complete ``results.json`` under ``output_dir/protocol``."""
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


# ---------------------------------------------------------------------------------------------
# Records: one (run, evaluated dataset) pair with its metrics


def _group_fields(protocol: str) -> tuple[str, ...]:
    """Row fields besides method and dataset that tell runs apart."""
    if protocol == "fewshot":
        return ("shots",)
    if protocol in TRANSFER_PROTOCOLS:
        return ("train_dataset",)
    return ()


def _records(result: dict[str, Any], protocol: str) -> list[dict[str, Any]]:
    cost = {field: result.get(field) for field in COST_FIELDS}
    base = {"method": result["method"], "seed": result["seed"], "model": result.get("model")}
    if protocol not in TRANSFER_PROTOCOLS:
        metrics = {m: result[m] for m in PROTOCOL_METRICS.get(protocol, ("accuracy",)) if m in result}
        group = {"shots": result.get("shots")} if protocol == "fewshot" else {}
        return [{**base, **group, "dataset": result["dataset"], "metrics": metrics, "cost": cost}]

    # The source row carries the training cost; a target row only its own evaluation speed.
    source = result.get("source", result["dataset"])
    records = [{**base, "train_dataset": source, "dataset": source, "role": "source",
                "metrics": {"accuracy": result["source_accuracy"]}, "cost": cost}]
    for name, target in result.get("targets", {}).items():
        records.append({**base, "train_dataset": source, "dataset": name, "role": "target",
                        "metrics": {"accuracy": target["accuracy"]},
                        "cost": {"eval_images_per_second": target.get("eval_images_per_second")}})
    return records


def finite_number(value: Any) -> float | None:
    """Return ``value`` as a float, or None for a missing, boolean or NaN value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value)):
        return float(value)
    return None


def _number_mean(values: Iterable[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.fmean(numbers) if numbers else None


def _dataset_rows(results: list[dict[str, Any]], protocol: str) -> list[dict[str, Any]]:
    metrics = PROTOCOL_METRICS.get(protocol, ("accuracy",))
    fields = _group_fields(protocol)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        for record in _records(result, protocol):
            key = (record["method"], *(record[f] for f in fields), record["dataset"])
            groups[key].append(record)

    rows = []
    for records in groups.values():
        first = records[0]
        row: dict[str, Any] = {"method": first["method"]}
        row.update({f: first[f] for f in fields})
        row["dataset"] = first["dataset"]
        if "role" in first:
            row["role"] = first["role"]
        row["seeds"] = sorted(r["seed"] for r in records)
        row["models"] = sorted({str(r["model"]) for r in records})
        for metric in metrics:
            if metric == "harmonic_mean" and protocol == "base2novel":
                continue
            values = [r["metrics"][metric] for r in records if metric in r["metrics"]]
            row[metric], row[f"{metric}_std"] = mean_std(values)
        if protocol == "base2novel":
            # HM of the seed means; its std is the spread of the per-seed HMs.
            row["harmonic_mean"] = harmonic_mean(row["base_accuracy"], row["novel_accuracy"])
            row["harmonic_mean_std"] = mean_std(r["metrics"]["harmonic_mean"] for r in records)[1]
        for cost in COST_FIELDS:
            row[cost] = _number_mean(r["cost"].get(cost) for r in records)
        rows.append(row)
    rows.sort(key=lambda r: (r["method"], *(_sort_key(r[f]) for f in fields), _DATASET_ORDER.get(r["dataset"], len(_DATASET_ORDER)), r["dataset"]))
    return rows


def _sort_key(value: Any) -> tuple:
    return (value is None, value if value is not None else 0)


def _average_rows(rows: list[dict[str, Any]], protocol: str) -> list[dict[str, Any]]:
    metrics = PROTOCOL_METRICS.get(protocol, ("accuracy",))
    fields = _group_fields(protocol)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("role") == "source":
            continue
        groups[(row["method"], *(row[f] for f in fields))].append(row)

    averages = []
    for members in groups.values():
        first = members[0]
        average: dict[str, Any] = {"method": first["method"]}
        average.update({f: first[f] for f in fields})
        average["dataset"] = AVERAGE
        average["datasets"] = [r["dataset"] for r in members]
        average["num_datasets"] = len(members)
        for metric in metrics:
            if metric == "harmonic_mean" and protocol == "base2novel":
                continue
            average[metric] = statistics.fmean(r[metric] for r in members)
        if protocol == "base2novel":
            average["harmonic_mean"] = harmonic_mean(average["base_accuracy"], average["novel_accuracy"])
        for cost in COST_FIELDS:
            average[cost] = _number_mean(r[cost] for r in members)
        averages.append(average)
    return averages


# ---------------------------------------------------------------------------------------------
# Published values and cost


def _attach_published(row: dict[str, Any], protocol: str, table: PublishedTable) -> None:
    entry = table.find(row["method"], protocol, row["dataset"], shots=row.get("shots"),
                       train_dataset=row.get("train_dataset"))
    if entry is None:
        return
    row["published_source"] = entry.source
    row["published_checked"] = entry.checked
    row["published_citation"] = entry.citation
    covered = True
    if row["dataset"] == AVERAGE:
        expected = table.average_over.get(protocol, ())
        covered = sorted(row["datasets"]) == sorted(expected)
        if not covered:
            row["published_note"] = (
                f"the published average is over {len(expected)} datasets, this one over "
                f"{row['num_datasets']}; no difference is computed"
            )
    for metric, value in entry.metrics.items():
        row[f"published_{metric}"] = value
        ours = row.get(metric)
        usable = covered and isinstance(ours, (int, float)) and not math.isnan(ours)
        row[f"diff_{metric}"] = ours - value if usable else None


def _method_costs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_method[result["method"]].append(result)
    costs = []
    for method, runs in sorted(by_method.items()):
        memory = [r["peak_memory_bytes"] for r in runs if isinstance(r.get("peak_memory_bytes"), (int, float))]
        params = sorted({r["trainable_params"] for r in runs if isinstance(r.get("trainable_params"), int)})
        costs.append({
            "method": method,
            "runs": len(runs),
            # Class-specific methods have a parameter count per class set, so all are listed.
            "trainable_params": params[0] if len(params) == 1 else (params or None),
            "train_seconds_per_epoch": _number_mean(r.get("train_seconds_per_epoch") for r in runs),
            "eval_images_per_second": _number_mean(r.get("eval_images_per_second") for r in runs),
            "peak_memory_bytes": max(memory) if memory else None,
            "peak_memory_kind": sorted({str(r.get("peak_memory_kind")) for r in runs}),
        })
    return costs


def summarize(results: list[dict[str, Any]], protocol: str, published: PublishedTable | None = None) -> dict[str, Any]:
    """Aggregate results over seeds, then over datasets, and set them against published values.

    Args:
        results: Complete results of one protocol, as :func:`load_results` returns them.
        protocol: Protocol name, a key of ``PROTOCOL_METRICS``.
        published: Table to compare with; None leaves the published columns out.

    Returns:
        ``rows`` (per method, group and dataset), ``averages`` (per method and group),
        ``cost`` (per method) and the protocol's ``metrics``.
    """
    rows = _dataset_rows(results, protocol)
    averages = _average_rows(rows, protocol)
    if published is not None:
        for row in rows + averages:
            _attach_published(row, protocol, published)
    models = sorted({str(r.get("model")) for r in results})
    return {
        "protocol": protocol,
        "metrics": list(PROTOCOL_METRICS.get(protocol, ("accuracy",))),
        "group_fields": list(_group_fields(protocol)),
        "models": models,
        "published_backbone": published.backbone if published is not None else None,
        "rows": rows,
        "averages": averages,
        "cost": _method_costs(results),
    }


# ---------------------------------------------------------------------------------------------
# Output formats


def format_cell(value: Any, digits: int = 2) -> str:
    """Format a table cell: ``-`` for None, ``digits`` decimals for floats, lists joined by commas."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, list):
        return ", ".join(format_cell(v, digits) for v in value)
    return str(value)


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _published_cells(row: dict[str, Any], metrics: Sequence[str]) -> list[str]:
    if "published_source" not in row:
        return ["-", "-", "-"]
    values = " / ".join(format_cell(row.get(f"published_{m}")) for m in metrics)
    diffs = " / ".join(_signed(row.get(f"diff_{m}")) for m in metrics)
    source = f"{row['published_source']}, {'checked' if row['published_checked'] else 'unchecked'}"
    return [values, diffs, source]


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out.extend("| " + " | ".join(cells) + " |" for cells in lines)
    return out


def to_markdown(summary: dict[str, Any]) -> str:
    """Render a :func:`summarize` result as Markdown tables."""
    protocol = summary["protocol"]
    metrics = summary["metrics"]
    fields = summary.get("group_fields", [])
    published_header = ["published (" + " / ".join(metrics) + ")", "difference", "published source"]
    lines = [f"# {protocol} summary", ""]
    lines.append("Accuracy in percent: mean ± sample standard deviation over seeds.")
    backbone = summary.get("published_backbone")
    if backbone:
        lines.append(f"Published values are for {backbone} CLIP; these runs used {', '.join(summary['models']) or '-'}. "
                     "'unchecked' marks paper values recalled without re-reading the paper.")
    lines.append("")

    lines += ["## Per dataset", ""]
    header = ["method", *fields, "dataset", "seeds", *metrics, *published_header]
    body = []
    for row in summary["rows"]:
        cells = [row["method"], *(format_cell(row.get(f)) for f in fields)]
        dataset = row["dataset"] + (" (source)" if row.get("role") == "source" else "")
        cells += [dataset, ",".join(str(s) for s in row["seeds"])]
        cells += [f"{format_cell(row.get(m))} ± {format_cell(row.get(f'{m}_std'))}" for m in metrics]
        body.append(cells + _published_cells(row, metrics))
    lines += _table(header, body) + [""]

    lines += ["## Average over datasets", ""]
    header = ["method", *fields, "datasets", *metrics, *published_header]
    body = []
    for row in summary["averages"]:
        cells = [row["method"], *(format_cell(row.get(f)) for f in fields), str(row["num_datasets"])]
        cells += [format_cell(row.get(m)) for m in metrics]
        body.append(cells + _published_cells(row, metrics))
    lines += _table(header, body) + [""]
    if protocol == "base2novel":
        lines.append("The average HM is the HM of the averaged base and novel accuracies, as the papers compute it.")
    notes = [
        " ".join([row["method"], *(f"{f} {row.get(f)}" for f in fields)]) + f": {row['published_note']}"
        for row in summary["averages"]
        if row.get("published_note")
    ]
    lines += [f"- {note}" for note in notes]
    lines.append("")

    lines += ["## Cost per method", ""]
    header = ["method", "runs", "trainable params", "train s/epoch", "eval images/s", "peak memory (MiB)", "memory measured as"]
    body = []
    for cost in summary["cost"]:
        memory = cost.get("peak_memory_bytes")
        body.append([
            cost["method"], str(cost["runs"]), format_cell(cost.get("trainable_params"), 0),
            format_cell(cost.get("train_seconds_per_epoch")), format_cell(cost.get("eval_images_per_second"), 1),
            format_cell(memory / 2**20 if memory else None, 0), ", ".join(cost.get("peak_memory_kind", [])),
        ])
    lines += _table(header, body)
    return "\n".join(lines) + "\n"


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Format rows as CSV with the union of their keys as columns; list values are joined with ';'."""
    fields: list[str] = []
    for row in rows:
        for key in row:
            if key not in fields:
                fields.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()})
    return buffer.getvalue()


def to_csv(summary: dict[str, Any]) -> str:
    """Per-dataset rows then average rows as CSV; list values are joined with ';'."""
    return rows_to_csv(summary["rows"] + summary["averages"])


def write_summary(output_dir: str | os.PathLike, protocol: str, published: PublishedTable | None = None) -> list[Path]:
    """Rebuild ``OUTPUT/PROTOCOL/summary.{json,md,csv}`` and ``summary_cost.csv`` from the results.

    Args:
        output_dir: The ``--output-dir`` of the runs.
        protocol: Protocol folder to summarize.
        published: Table to compare with; None reads the one shipped with the package.

    Returns:
        The written paths.
    """
    table = published if published is not None else load_published()
    summary = summarize(load_results(output_dir, protocol), protocol, table)
    return write_summary_files(summary, Path(output_dir) / protocol)


def write_summary_files(summary: dict[str, Any], root: Path) -> list[Path]:
    """Write a :func:`summarize` result as ``summary.{json,md,csv}`` and ``summary_cost.csv`` in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / "summary.json", root / "summary.md", root / "summary.csv", root / "summary_cost.csv"]
    write_json_atomic(paths[0], summary)
    write_text_atomic(paths[1], to_markdown(summary))
    write_text_atomic(paths[2], to_csv(summary))
    write_text_atomic(paths[3], rows_to_csv(summary["cost"]))
    return paths

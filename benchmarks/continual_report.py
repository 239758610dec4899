"""Continual-learning summaries, the accuracy-matrix heatmap and the published MTIL numbers.

Summaries are built from the ``results.json`` files under ``OUTPUT/continual``, never from logs.
Each row is one stream and one method with its plugins: the mean and sample standard deviation
over seeds of Avg, Last, Transfer, forgetting and backward transfer. The published numbers of the
same MTIL setting follow each stream. Plots are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, so
no pyplot backend is chosen.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._io import write_json_atomic, write_text_atomic
from .summary import finite_number, format_cell, load_results, mean_std

PROTOCOL = "continual"
METRICS = ("avg", "last", "transfer", "forgetting", "bwt")
COST_FIELDS = ("trainable_params", "train_seconds_per_epoch", "eval_images_per_second", "peak_memory_bytes")

ZSCL_NOTEBOOK = "ZSCL (Zheng et al., ICCV 2023), repository Thunderbeee/ZSCL, mtil/results.ipynb"
CODYRA_README = "CoDyRA repository README table (secondary copy, not traced to each paper)"
LATER_TABLES = "tables of later MTIL papers (DIKI, NuSA-CL); secondary copy, not traced to the paper"


@dataclass(frozen=True)
class PublishedMTIL:
    """One published MTIL result with CLIP ViT-B/16, in percent.

    Attributes:
        shots: None for the full training sets, 5 for few-shot MTIL.
        note: what differs from this harness's protocol.
    """

    method: str
    order: int
    shots: int | None
    transfer: float
    avg: float
    last: float
    source: str
    note: str = ""


_FULL_FT = "full fine-tuning of CLIP, torchvision splits (Caltech101, EuroSAT, SUN397 split 80/20 at random)"

PUBLISHED_MTIL: tuple[PublishedMTIL, ...] = (
    PublishedMTIL("Zero-shot CLIP", 1, None, 69.4, 65.3, 65.3, ZSCL_NOTEBOOK, "template ensembles per dataset"),
    PublishedMTIL("Continual fine-tuning", 1, None, 44.6, 55.9, 77.3, ZSCL_NOTEBOOK, _FULL_FT),
    PublishedMTIL("LwF", 1, None, 56.9, 64.7, 74.6, ZSCL_NOTEBOOK, _FULL_FT),
    PublishedMTIL("ZSCL", 1, None, 68.1, 75.4, 83.6, ZSCL_NOTEBOOK, _FULL_FT + ", ImageNet and caption distillation"),
    PublishedMTIL("MoE-Adapters (CVPR 2024)", 1, None, 68.9, 76.7, 85.0, LATER_TABLES, "59.6M trainable parameters"),
    PublishedMTIL("DIKI (ECCV 2024)", 1, None, 68.7, 76.3, 85.1, LATER_TABLES, "prompt-based, CoOp splits"),
    PublishedMTIL("Zero-shot CLIP", 2, None, 65.4, 65.3, 65.3, ZSCL_NOTEBOOK, "template ensembles per dataset"),
    PublishedMTIL("Continual fine-tuning", 2, None, 46.6, 56.2, 67.4, ZSCL_NOTEBOOK, _FULL_FT),
    PublishedMTIL("LwF", 2, None, 53.2, 62.2, 71.9, ZSCL_NOTEBOOK, _FULL_FT),
    PublishedMTIL("ZSCL", 2, None, 64.2, 74.5, 83.4, ZSCL_NOTEBOOK, _FULL_FT + ", ImageNet and caption distillation"),
    PublishedMTIL("Zero-shot CLIP", 1, 5, 69.4, 65.3, 65.3, ZSCL_NOTEBOOK, "no training, so the shots do not matter"),
    PublishedMTIL("ZSCL", 1, 5, 65.3, 64.4, 67.4, CODYRA_README, "5-shot"),
    PublishedMTIL("MoE-Adapters (CVPR 2024)", 1, 5, 68.9, 71.4, 76.1, CODYRA_README, "5-shot"),
)
"""Published MTIL Transfer/Avg/Last (ViT-B/16)."""

MTIL_ZERO_SHOT_VITB16: dict[str, float] = {
    "fgvc_aircraft": 24.3, "caltech101": 88.4, "cifar100": 68.2, "dtd": 44.6, "eurosat": 54.9,
    "oxford_flowers": 71.0, "food101": 88.5, "mnist": 59.4, "oxford_pets": 89.0, "stanford_cars": 64.7,
    "sun397": 65.2,
}
"""Zero-shot CLIP ViT-B/16 per MTIL dataset as ZSCL's results notebook uses it (template ensembles)."""


def published_mtil(order: int | None, shots: int | None) -> list[PublishedMTIL]:
    """Return the published rows for MTIL with this order and shot count (empty when none exist)."""
    return [entry for entry in PUBLISHED_MTIL if entry.order == order and entry.shots == shots]


# ---------------------------------------------------------------------------------------------
# Heatmap


def plot_accuracy_matrix(matrix: Sequence[Sequence[float | None]], row_labels: Sequence[str],
                         column_labels: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Draw the accuracy matrix as an annotated heatmap PNG (blank cells were not evaluated)."""
    import numpy as np

    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    rows, columns = values.shape
    figure = Figure(figsize=(max(4.0, 0.8 * columns + 2.5), max(3.0, 0.45 * rows + 1.8)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    axes.set_xticks(range(columns), labels=list(column_labels), rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(rows), labels=list(row_labels), fontsize=8)
    axes.set_xlabel("evaluated task")
    axes.set_ylabel("evaluation point")
    for i in range(rows):
        for j in range(columns):
            if not math.isnan(values[i, j]):
                color = "black" if values[i, j] > 60 else "white"
                axes.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=7, color=color)
    figure.colorbar(image, ax=axes, label="top-1 accuracy (%)")
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Summary


def _zero_shot_row(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over seeds of the row before training, by dataset name (task-aware streams only)."""
    by_dataset: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if not run.get("task_aware") or not run.get("accuracy_matrix"):
            continue
        for task, value in zip(run["tasks"], run["accuracy_matrix"][0]):
            if finite_number(value) is not None:
                by_dataset[task["dataset"]].append(float(value))
    return {name: statistics.fmean(values) for name, values in by_dataset.items()}


def summarize_continual(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows per (stream, method with plugins): means and standard deviations over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[(result["dataset"], result["method_label"])].append(result)
    rows = []
    for (stream, label), runs in sorted(groups.items()):
        first = runs[0]
        row: dict[str, Any] = {
            "stream": stream,
            "method": label,
            "kind": first.get("stream"),
            "order": first.get("order"),
            "shots": first.get("shots"),
            "model": first.get("model"),
            "seeds": sorted(r["seed"] for r in runs),
        }
        for metric in (*METRICS, "zero_shot_transfer"):
            values = [v for v in (finite_number(r.get(metric)) for r in runs) if v is not None]
            row[metric], row[f"{metric}_std"] = mean_std(values) if values else (None, None)
        for cost in COST_FIELDS:
            values = [v for v in (finite_number(r.get(cost)) for r in runs) if v is not None]
            row[cost] = statistics.fmean(values) if values else None
        row["zero_shot_row"] = _zero_shot_row(runs)
        rows.append(row)
    published = {}
    for row in rows:
        if row["kind"] == "mtil":
            entries = published_mtil(row["order"], row["shots"])
            published[row["stream"]] = [asdict(entry) for entry in entries]
    return {"protocol": PROTOCOL, "metrics": list(METRICS), "rows": rows, "published": published}


def to_markdown(summary: dict[str, Any]) -> str:
    header = ["stream", "method", "seeds", "Avg", "Last", "Transfer", "forgetting", "BWT",
              "zero-shot Transfer", "trainable params", "train s/epoch", "eval img/s", "peak memory (MiB)"]
    lines = ["# continual summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        cells = [row["stream"], row["method"], ",".join(str(s) for s in row["seeds"])]
        for metric in (*METRICS, "zero_shot_transfer"):
            std = row.get(f"{metric}_std")
            cells.append(format_cell(row[metric]) + (f" ± {format_cell(std)}" if std else ""))
        memory = row.get("peak_memory_bytes")
        cells += [format_cell(row.get("trainable_params"), 0), format_cell(row.get("train_seconds_per_epoch")),
                  format_cell(row.get("eval_images_per_second"), 1), format_cell(memory / 2**20 if memory else None, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Avg, Last and Transfer follow ZSCL's MTIL definitions on the trained rows; for "
              "class-incremental streams Avg is the average incremental accuracy and Last the final "
              "accuracy. Forgetting is max-based (Chaudhry et al.), BWT as in GEM.", ""]
    for stream, entries in summary["published"].items():
        lines += [f"## Published MTIL numbers for {stream} (CLIP ViT-B/16)", ""]
        if not entries:
            lines += ["No published numbers for this order and shot count.", ""]
            continue
        lines += ["| method | Transfer | Avg | Last | source | differs from this harness |", "|---|---|---|---|---|---|"]
        for entry in entries:
            lines.append(
                f"| {entry['method']} | {entry['transfer']:.1f} | {entry['avg']:.1f} | {entry['last']:.1f} "
                f"| {entry['source']} | {entry['note'] or '-'} |"
            )
        lines += ["", "This harness uses the CoOp split_zhou test lists for the nine CoOp datasets and "
                  "one hand-crafted template per dataset, so compare zero-shot rows first; the numbers "
                  "are only comparable for --model ViT-B-16 --pretrained openai.", ""]
        lines += _zero_shot_table(stream, [row for row in summary["rows"] if row["stream"] == stream])
    return "\n".join(lines) + "\n"


def _zero_shot_table(stream: str, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of each method's row before training next to ZSCL's zero-shot CLIP."""
    names = list(MTIL_ZERO_SHOT_VITB16)
    lines = [f"### Row before training on {stream}, per dataset", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| zero-shot CLIP ViT-B/16 (ZSCL notebook) | " + " | ".join(f"{MTIL_ZERO_SHOT_VITB16[n]:.1f}" for n in names) + " |"]
    for row in rows:
        values = row.get("zero_shot_row", {})
        lines.append(f"| {row['method']} | " + " | ".join(format_cell(values.get(n), 1) for n in names) + " |")
    return [*lines, ""]


def to_csv(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    fields = [key for key in (rows[0] if rows else {}) if not isinstance(rows[0][key], (list, dict))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_continual_summary(output_dir: str | os.PathLike) -> list[Path]:
    """Rebuild ``OUTPUT/continual/summary.{json,md,csv}`` from the results files."""
    summary = summarize_continual(load_results(output_dir, PROTOCOL))
    root = Path(output_dir) / PROTOCOL
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / "summary.json", root / "summary.md", root / "summary.csv"]
    write_json_atomic(paths[0], summary)
    write_text_atomic(paths[1], to_markdown(summary))
    write_text_atomic(paths[2], to_csv(summary))
    return paths

"""Summaries and PNG plots of every protocol found under a runs folder.

The plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, without pyplot,
so no global backend is chosen and no display is needed.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .published import AVERAGE, PROTOCOL_METRICS, load_published
from .summary import load_results, summarize, write_summary_files

logger = logging.getLogger(__name__)

CONTINUAL = "continual"
FEDERATED = "federated"

_METRIC_LABELS = {"base_accuracy": "base", "novel_accuracy": "novel", "harmonic_mean": "HM", "accuracy": "accuracy"}


def write_report(runs_dir: str | os.PathLike[str], published_path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Rebuild the summaries of every protocol folder under ``runs_dir`` and plot them.

    Continual and federated runs get their own summary files (`benchmarks.continual_report`,
    `benchmarks.federated_report`); federated runs also get ``federated/plots/rounds.png``.

    Plots go to ``RUNS_DIR/PROTOCOL/plots/``:

    - base-to-novel: one bar chart of base, novel and HM per dataset for each method;
    - few-shot: accuracy against shots, one panel per dataset and one for the average;
    - transfer protocols: one bar chart of accuracy per dataset.

    Args:
        runs_dir: The ``--output-dir`` of earlier runs.
        published_path: Published table to compare with; None uses the shipped one.

    Returns:
        Every written file.

    Raises:
        FileNotFoundError: If ``runs_dir`` does not exist or contains no protocol folder.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs folder {runs_dir} not found; pass the --output-dir of earlier runs")
    protocols = [name for name in PROTOCOL_METRICS if (runs_dir / name).is_dir()]
    continual = (runs_dir / CONTINUAL).is_dir()
    federated = (runs_dir / FEDERATED).is_dir()
    if not protocols and not continual and not federated:
        raise FileNotFoundError(
            f"no protocol folder ({', '.join([*PROTOCOL_METRICS, CONTINUAL, FEDERATED])}) under {runs_dir}; "
            "pass the --output-dir of earlier runs"
        )
    table = load_published(published_path)
    written: list[Path] = []
    for protocol in protocols:
        summary = summarize(load_results(runs_dir, protocol), protocol, table)
        written += write_summary_files(summary, runs_dir / protocol)
        if not summary["rows"]:
            logger.warning("%s: no complete results under %s, so nothing to plot", protocol, runs_dir / protocol)
            continue
        written += plot_summary(summary, runs_dir / protocol / "plots")
    if continual:
        # Continual runs report an accuracy matrix, summarized by their own module.
        from .continual_report import write_continual_summary

        written += write_continual_summary(runs_dir)
    if federated:
        from .federated_report import write_federated_summary

        written += write_federated_summary(runs_dir)
    return written


def plot_summary(summary: dict[str, Any], folder: Path) -> list[Path]:
    """Draw the plots of one protocol's summary into ``folder`` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    protocol = summary["protocol"]
    if protocol == "base2novel":
        return [_plot_base2novel(summary, method, folder / f"{method}.png") for method in _methods(summary)]
    if protocol == "fewshot":
        return [_plot_fewshot(summary, folder / "accuracy_vs_shots.png")]
    return [_plot_transfer(summary, folder / "accuracy.png")]


def _methods(summary: dict[str, Any]) -> list[str]:
    return sorted({row["method"] for row in summary["rows"]})


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def _grouped_bars(axes, groups: Sequence[str], series: dict[str, Sequence[float]]) -> None:
    """Bars of several series side by side for each group label."""
    width = 0.8 / max(len(series), 1)
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(positions, [v if v is not None and not math.isnan(v) else 0.0 for v in values], width, label=label)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(groups, rotation=45, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small")


def _plot_base2novel(summary: dict[str, Any], method: str, path: Path) -> Path:
    rows = [r for r in summary["rows"] + summary["averages"] if r["method"] == method]
    metrics = summary["metrics"]
    figure = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    _grouped_bars(axes, [r["dataset"] for r in rows], {_METRIC_LABELS[m]: [r.get(m) for r in rows] for m in metrics})
    axes.set_title(f"base-to-novel: {method}")
    return _save(figure, path)


def _plot_fewshot(summary: dict[str, Any], path: Path) -> Path:
    # One panel per dataset, then the average; one line per method, shots on a log2 axis.
    panels: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in summary["rows"] + summary["averages"]:
        if isinstance(row.get("shots"), int):
            panels[row["dataset"]][row["method"]].append((row["shots"], row["accuracy"]))
    names = [name for name in dict.fromkeys(r["dataset"] for r in summary["rows"]) if name in panels]
    if AVERAGE in panels:
        names.append(AVERAGE)
    columns = min(4, max(len(names), 1))
    rows = math.ceil(len(names) / columns) if names else 1
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows), layout="constrained")
    for index, name in enumerate(names, 1):
        axes = figure.add_subplot(rows, columns, index)
        for method, points in sorted(panels[name].items()):
            points.sort()
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        shots = sorted({p[0] for points in panels[name].values() for p in points})
        axes.set_xscale("log", base=2)
        axes.set_xticks(shots)
        axes.set_xticklabels([str(k) for k in shots])
        axes.minorticks_off()
        axes.set_title(name)
        axes.set_xlabel("shots per class")
        axes.set_ylabel("accuracy (%)")
        if index == 1:
            axes.legend(fontsize="small")
    return _save(figure, path)


def _plot_transfer(summary: dict[str, Any], path: Path) -> Path:
    rows = summary["rows"] + summary["averages"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    runs = sorted({(r["method"], r["train_dataset"]) for r in rows})
    several_sources = len({source for _, source in runs}) > 1
    series = {}
    for method, source in runs:
        values = {r["dataset"]: r.get("accuracy") for r in rows if (r["method"], r["train_dataset"]) == (method, source)}
        series[f"{method} (trained on {source})" if several_sources else method] = [values.get(name) for name in datasets]
    figure = Figure(figsize=(max(6.0, 0.8 * len(datasets) * max(len(series), 1) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    sources = {r["dataset"] for r in rows if r.get("role") == "source"}
    _grouped_bars(axes, [f"{name} (source)" if name in sources else name for name in datasets], series)
    axes.set_title(f"{summary['protocol']}: accuracy per dataset")
    return _save(figure, path)

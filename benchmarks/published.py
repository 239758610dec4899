"""Published accuracies of prompt-learning methods, shipped as `benchmarks/data/published.json`.

Each entry gives the metric values of one method, protocol and dataset (or "average") with
ViT-B/16 CLIP. It names where the values were read (`source`: "paper" or "repository") with a
citation. `checked` is true for values read in a repository file or README, and false for
paper-table values recalled without re-reading. Summaries set the runs against these values.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

PUBLISHED_FORMAT = 1
"""Version of the table layout; other versions are rejected."""

PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "base2novel": ("base_accuracy", "novel_accuracy", "harmonic_mean"),
    "fewshot": ("accuracy",),
    "cross-dataset": ("accuracy",),
    "domain-generalization": ("accuracy",),
}
"""Metrics (accuracy in percent) that each protocol reports per dataset."""

TRANSFER_PROTOCOLS: tuple[str, ...] = ("cross-dataset", "domain-generalization")
"""Protocols that train on one dataset and evaluate on others; entries name `train_dataset`."""

SOURCES: tuple[str, ...] = ("paper", "repository")
AVERAGE = "average"
"""Dataset name of the entries that give an average over datasets."""


@dataclass(frozen=True)
class PublishedEntry:
    """One published result."""

    method: str
    """Registry name of the method, e.g. "coop"."""
    protocol: str
    """One of `PROTOCOL_METRICS`."""
    dataset: str
    """Registry name of the evaluated dataset, or "average"."""
    shots: int | None
    """Training images per class; None for zero-shot CLIP."""
    train_dataset: str | None
    """Dataset trained on, for the transfer protocols; None otherwise."""
    metrics: Mapping[str, float]
    """Metric name -> accuracy in percent; a subset of the protocol's metrics."""
    decimals: int
    """Decimals the source prints, which bounds the rounding error of the values."""
    source: str
    """"paper" or "repository": where the values were read."""
    citation: str
    checked: bool
    """True when the values were read in a repository file or README."""


@dataclass(frozen=True)
class PublishedTable:
    """The published entries with the backbone they were measured on."""

    backbone: str
    average_over: Mapping[str, tuple[str, ...]]
    """Protocol -> the datasets that the published "average" entries average over."""
    entries: tuple[PublishedEntry, ...]

    def find(self, method: str, protocol: str, dataset: str, shots: int | None = None,
             train_dataset: str | None = None) -> PublishedEntry | None:
        """Return the entry for these keys, or None.

        Shots are compared for the few-shot protocol only, and `train_dataset` for the transfer
        protocols only, because the other protocols have one setting each.
        """
        for entry in self.entries:
            if (entry.method, entry.protocol, entry.dataset) != (method, protocol, dataset):
                continue
            if protocol == "fewshot" and entry.shots != shots:
                continue
            if protocol in TRANSFER_PROTOCOLS and entry.train_dataset != train_dataset:
                continue
            return entry
        return None


def default_published_path() -> Path:
    """Return the path of the table shipped with the package."""
    return Path(str(resources.files("benchmarks") / "data" / "published.json"))


def load_published(path: str | os.PathLike[str] | None = None) -> PublishedTable:
    """Read and validate a published table.

    Args:
        path: JSON file; None reads the table shipped with the package.

    Returns:
        The validated table.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not valid JSON, has another format version, or an entry is
            malformed. The message names the entry index and the field.
    """
    path = Path(path) if path is not None else default_published_path()
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Published table {path} is not valid JSON: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != PUBLISHED_FORMAT:
        raise ValueError(f"Published table {path} must be a JSON object with format {PUBLISHED_FORMAT}.")

    average_over = payload.get("average_over")
    if not isinstance(average_over, dict) or set(average_over) != set(PROTOCOL_METRICS):
        raise ValueError(f"Published table {path}: 'average_over' must map each of "
                         f"{sorted(PROTOCOL_METRICS)} to its list of datasets.")
    entries = payload.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"Published table {path}: 'entries' must be a list.")

    parsed = tuple(_parse_entry(raw, index, path) for index, raw in enumerate(entries))
    keys = [(e.method, e.protocol, e.dataset, e.shots if e.protocol == "fewshot" else None,
             e.train_dataset) for e in parsed]
    duplicates = sorted({str(key) for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"Published table {path} has several entries for {duplicates[:3]}.")
    return PublishedTable(
        backbone=str(payload.get("backbone", "")),
        average_over={name: tuple(names) for name, names in average_over.items()},
        entries=parsed,
    )


def _parse_entry(raw: Any, index: int, path: Path) -> PublishedEntry:
    def fail(problem: str) -> ValueError:
        return ValueError(f"Published table {path}, entry {index} ({raw!r}): {problem}")

    if not isinstance(raw, dict):
        raise fail("expected a JSON object")
    for key in ("method", "protocol", "dataset", "citation"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise fail(f"{key!r} must be a non-empty string")
    protocol = raw["protocol"]
    if protocol not in PROTOCOL_METRICS:
        raise fail(f"protocol {protocol!r} is not one of {sorted(PROTOCOL_METRICS)}")
    if raw.get("source") not in SOURCES:
        raise fail(f"source {raw.get('source')!r} is not one of {list(SOURCES)}")
    if not isinstance(raw.get("checked"), bool):
        raise fail("'checked' must be true or false")
    shots = raw.get("shots")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise fail(f"shots {shots!r} must be an int >= 1 or null")
    if protocol == "fewshot" and shots is None:
        raise fail("few-shot entries need 'shots'")
    train_dataset = raw.get("train_dataset")
    if (protocol in TRANSFER_PROTOCOLS) != isinstance(train_dataset, str):
        raise fail("'train_dataset' is required for the transfer protocols and not allowed otherwise")
    decimals = raw.get("decimals")
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 4:
        raise fail(f"decimals {decimals!r} must be an int in 0..4")

    metrics = raw.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise fail("'metrics' must be a non-empty object")
    allowed = PROTOCOL_METRICS[protocol]
    for name, value in metrics.items():
        if name not in allowed:
            raise fail(f"metric {name!r} is not one of {list(allowed)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0.0 <= value <= 100.0:
            raise fail(f"metric {name!r} = {value!r} must be a number in 0..100")
    return PublishedEntry(
        method=raw["method"],
        protocol=protocol,
        dataset=raw["dataset"],
        shots=shots,
        train_dataset=train_dataset,
        metrics={name: float(value) for name, value in metrics.items()},
        decimals=decimals,
        source=raw["source"],
        citation=raw["citation"],
        checked=raw["checked"],
    )


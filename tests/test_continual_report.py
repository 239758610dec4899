"""Continual summaries: seed statistics, published MTIL rows and the zero-shot comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.continual_report import (
    MTIL_ZERO_SHOT_VITB16,
    published_mtil,
    summarize_continual,
    to_csv,
    to_markdown,
    write_continual_summary,
)


def _result(seed: int, avg: float, zero_shot: list[float], **extra) -> dict:
    return {
        "complete": True, "protocol": "continual", "dataset": "mtil-order1-full", "method_label": "coop+ewc",
        "stream": "mtil", "order": 1, "shots": None, "model": "ViT-B-16", "seed": seed, "task_aware": True,
        "avg": avg, "last": 80.0, "transfer": 65.0, "forgetting": 3.0, "bwt": -2.0, "zero_shot_transfer": 66.0,
        "tasks": [{"dataset": "fgvc_aircraft"}, {"dataset": "caltech101"}],
        "accuracy_matrix": [zero_shot, [30.0, 87.0], [29.0, 90.0]], **extra,
    }


def test_published_rows_by_order_and_shots() -> None:
    zscl = [e for e in published_mtil(1, None) if e.method == "ZSCL"]

    assert (zscl[0].transfer, zscl[0].avg, zscl[0].last) == (68.1, 75.4, 83.6)
    assert {e.method for e in published_mtil(2, None)} >= {"Zero-shot CLIP", "ZSCL"}
    assert {e.method for e in published_mtil(1, 5)} == {"Zero-shot CLIP", "ZSCL", "MoE-Adapters (CVPR 2024)"}
    assert published_mtil(2, 16) == []
    assert len(MTIL_ZERO_SHOT_VITB16) == 11


def test_summary_means_and_zero_shot_row() -> None:
    summary = summarize_continual([_result(1, 70.0, [24.0, 88.0]), _result(2, 72.0, [26.0, 88.0])])
    row = summary["rows"][0]
    markdown = to_markdown(summary)

    assert row["avg"] == pytest.approx(71.0)
    assert row["avg_std"] == pytest.approx(2 ** 0.5)
    assert row["seeds"] == [1, 2]
    assert row["zero_shot_row"] == {"fgvc_aircraft": 25.0, "caltech101": 88.0}
    assert [e["method"] for e in summary["published"]["mtil-order1-full"]][0] == "Zero-shot CLIP"
    assert "| ZSCL | 68.1 | 75.4 | 83.6 |" in markdown
    assert "| coop+ewc | 25.0 | 88.0 | - |" in markdown
    assert "zero_shot_row" not in to_csv(summary).splitlines()[0]


def test_write_summary_skips_incomplete(tmp_path: Path) -> None:
    folder = tmp_path / "continual" / "mtil-order1-full" / "coop+ewc"
    for seed, complete in ((1, True), (2, False)):
        run = folder / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(_result(seed, 70.0 + seed, [24.0, 88.0], complete=complete)))

    paths = write_continual_summary(tmp_path)
    summary = json.loads(paths[0].read_text())

    assert [p.name for p in paths] == ["summary.json", "summary.md", "summary.csv"]
    assert summary["rows"][0]["seeds"] == [1]
    assert summary["rows"][0]["avg"] == pytest.approx(71.0)

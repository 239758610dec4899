"""bench_speed.py runs end to end on toy-clip and reports every method side by side."""

from __future__ import annotations

import json

import pytest

import bench_speed
from learners import list_methods


@pytest.mark.slow
def test_quick_run_reports_every_method(tmp_path, capsys):
    output = tmp_path / "bench.json"
    status = bench_speed.main(
        ["--model", "toy-clip", "--classes", "10", "--quick", "--work-dir", str(tmp_path / "work"), "--output", str(output)]
    )
    assert status == 0

    report = json.loads(output.read_text())
    assert report["machine"]["nproc"] >= 1
    assert [group["classes"] for group in report["results"]] == [10]
    rows = {row["method"]: row for row in report["results"][0]["rows"]}
    assert set(rows) == {"text tower (CoOp prompts)", *list_methods()}
    for name, row in rows.items():
        assert not any(note.startswith("failed") for note in row["notes"]), (name, row["notes"])
        assert row["max_logit_difference"] < 1e-4, name
        assert row["eval_speedup"] is not None or name.startswith("text tower"), name
    assert rows["coop"]["train_speedup"] > 0
    assert rows["zeroshot"]["train_on"] is None  # nothing to train
    printed = capsys.readouterr().out
    assert "| coop | 10 |" in printed
    assert "load average" in printed

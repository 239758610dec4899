"""``run_benchmark.py report``: summaries and PNG plots rebuilt from results files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from run_benchmark import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COST = {"trainable_params": 2048, "train_seconds_per_epoch": 1.5, "eval_images_per_second": 90.0,
        "peak_memory_bytes": 2**30, "peak_memory_kind": "cpu_max_rss", "model": "toy-clip"}


def write_results(path: Path, **fields) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"complete": True, **COST, **fields}))


def make_runs(root: Path) -> None:
    for method, offset in (("coop", 0.0), ("kgcoop", 5.0)):
        for dataset in ("caltech101", "dtd"):
            for seed in (1, 2):
                write_results(root / "base2novel" / dataset / method / f"seed{seed}", protocol="base2novel",
                              method=method, dataset=dataset, seed=seed, base_accuracy=70.0 + offset + seed,
                              novel_accuracy=60.0 + offset, harmonic_mean=64.0 + offset)
                for shots in (1, 2, 4):
                    write_results(root / "fewshot" / dataset / method / f"shots{shots}" / f"seed{seed}",
                                  protocol="fewshot", method=method, dataset=dataset, seed=seed, shots=shots,
                                  accuracy=40.0 + 5 * shots + offset)
        for protocol, targets in (("cross-dataset", ("dtd", "eurosat")),
                                  ("domain-generalization", ("imagenetv2", "imagenet_a"))):
            write_results(root / protocol / "imagenet" / method / "seed1", protocol=protocol, method=method,
                          dataset="imagenet", source="imagenet", seed=1, source_accuracy=70.0 + offset,
                          targets={t: {"accuracy": 50.0 + offset, "eval_images_per_second": 80.0} for t in targets})


def test_report_writes_summaries_and_pngs(tmp_path):
    make_runs(tmp_path)
    assert main(["report", str(tmp_path), "--log-level", "WARNING"]) == 0

    expected_plots = [
        "base2novel/plots/coop.png", "base2novel/plots/kgcoop.png", "fewshot/plots/accuracy_vs_shots.png",
        "cross-dataset/plots/accuracy.png", "domain-generalization/plots/accuracy.png",
    ]
    for name in expected_plots:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 1000, name
    for protocol in ("base2novel", "fewshot", "cross-dataset", "domain-generalization"):
        for name in ("summary.json", "summary.md", "summary.csv", "summary_cost.csv"):
            assert (tmp_path / protocol / name).is_file(), (protocol, name)

    fewshot = json.loads((tmp_path / "fewshot" / "summary.json").read_text())
    assert {(a["method"], a["shots"]) for a in fewshot["averages"]} == {(m, k) for m in ("coop", "kgcoop") for k in (1, 2, 4)}
    base2novel = json.loads((tmp_path / "base2novel" / "summary.json").read_text())
    coop = next(a for a in base2novel["averages"] if a["method"] == "coop")
    assert coop["base_accuracy"] == 71.5
    assert coop["published_base_accuracy"] == 82.69


def test_report_missing_folder(tmp_path):
    assert main(["report", str(tmp_path / "missing"), "--log-level", "CRITICAL"]) == 2
    assert main(["report", str(tmp_path), "--log-level", "CRITICAL"]) == 2


def test_report_rebuilds_continual_summary(tmp_path):
    (tmp_path / "continual").mkdir()
    assert main(["report", str(tmp_path), "--log-level", "WARNING"]) == 0
    assert (tmp_path / "continual" / "summary.json").is_file()
    assert (tmp_path / "continual" / "summary.md").is_file()


def test_report_summarizes_federated_runs(tmp_path):
    tag = "dirichlet-a0.3-c2-fedavg-s16-r2e1"
    for seed, final in ((1, 60.0), (2, 64.0)):
        rounds = [{"round": 1, "global_accuracy": 50.0, "local_accuracy_mean": 55.0},
                  {"round": 2, "global_accuracy": final, "local_accuracy_mean": final + 10}]
        write_results(tmp_path / "federated" / "caltech101" / "coop" / tag / f"seed{seed}", protocol="federated",
                      method="coop", dataset="caltech101", seed=seed, run_tag=tag, partition="dirichlet",
                      strategy="fedavg", num_clients=2, global_accuracy=final, local_accuracy_mean=final + 10,
                      rounds_completed=2, bytes_sent_total=2**21, bytes_received_total=2**20, seconds=3.0,
                      clients_failed_total=seed - 1, rounds=rounds)
    # A run that did not finish is left out.
    write_results(tmp_path / "federated" / "caltech101" / "coop" / tag / "seed3", complete=False, protocol="federated",
                  method="coop", dataset="caltech101", seed=3, run_tag=tag, global_accuracy=0.0)

    assert main(["report", str(tmp_path), "--log-level", "WARNING"]) == 0

    summary = json.loads((tmp_path / "federated" / "summary.json").read_text())
    (row,) = summary["rows"]
    assert (row["dataset"], row["method"], row["run"], row["seeds"]) == ("caltech101", "coop", tag, [1, 2])
    assert row["global_accuracy"] == 62.0
    assert row["global_accuracy_std"] == pytest.approx(2.8284, abs=1e-4)
    assert row["local_accuracy_mean"] == 72.0
    assert row["base_accuracy"] is None
    assert row["clients_failed_total"] == 0.5
    assert row["rounds"] == [{"round": 1, "global_accuracy": 50.0, "local_accuracy_mean": 55.0},
                             {"round": 2, "global_accuracy": 62.0, "local_accuracy_mean": 72.0}]
    markdown = (tmp_path / "federated" / "summary.md").read_text()
    assert f"| caltech101 | coop | {tag} | 1,2 | 62.00 ± 2.83 |" in markdown
    assert "| 2 | 2.00 | 1.00 | 3.0 | 0.5 |" in markdown
    assert (tmp_path / "federated" / "summary.csv").read_text().splitlines()[1].startswith(f"caltech101,coop,{tag},")
    assert (tmp_path / "federated" / "plots" / "rounds.png").read_bytes().startswith(PNG_SIGNATURE)

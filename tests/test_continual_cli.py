"""The continual protocol end to end on fake datasets with toy-clip (random weights, offline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import run_benchmark
from benchmarks.continual import StreamSpec
from plugins.continual_metrics import summarize_matrix
from strategies.continual import ContinualSettings, run_continual
from strategies.experiment import RunSettings
from tests.fixtures.coop_layouts import make_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("continual_cli_data")
    for name in ("eurosat", "dtd"):
        make_dataset(name, root, per_class=(2, 0, 1))
    make_dataset("fgvc_aircraft", root, num_classes=7, per_class=(1, 0, 1))
    return root


def test_two_task_run_through_cli(data_root: Path, tmp_path: Path, caplog) -> None:
    argv = [
        "continual", "--method", "coop", "--stream", "datasets", "--datasets", "eurosat,dtd", "--plugins", "kg,ewc",
        "--set", "ewc.ewc_lambda=10", "--model", "toy-clip", "--pretrained", "none", "--epochs", "1",
        "--batch-size", "4", "--shots", "2", "--data-root", str(data_root), "--cache-dir", str(tmp_path / "cache"),
        "--output-dir", str(tmp_path / "runs"), "--no-progress", "--log-level", "WARNING",
    ]
    assert run_benchmark.main(argv) == 0
    run = tmp_path / "runs" / "continual" / "datasets-eurosat+dtd-order1-2shot" / "coop+kg+ewc" / "seed1"
    results = json.loads((run / "results.json").read_text())
    summary = summarize_matrix(results["accuracy_matrix"])

    assert results["complete"] and results["protocol"] == "continual"
    assert results["plugins"] == ["kg", "ewc"]
    assert results["accuracy_matrix_rows"] == ["zero-shot", "after 1: eurosat", "after 2: dtd"]
    assert results["accuracy_matrix_columns"] == ["eurosat", "dtd"]
    assert [len(row) for row in results["accuracy_matrix"]] == [2, 2, 2]
    for key in ("avg", "last", "transfer", "forgetting", "bwt"):
        assert results[key] == pytest.approx(summary[key])
    assert len(results["forgetting_per_task"]) == len(results["bwt_per_task"]) == 1
    assert results["total_matrix"] == [[5, 5]] * 3
    assert results["config"]["plugins"]["ewc"]["ewc_lambda"] == 10
    assert "ewc" in results["epochs"][1][0]
    assert results["epochs"][0][0]["plugin_kg"] > 0
    for key in ("trainable_params", "train_seconds_per_epoch", "eval_images_per_second", "peak_memory_bytes"):
        assert results[key] > 0
    assert (run / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run / "csv" / "eval_results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["eval_accuracy"]) for r in rows] == pytest.approx(
        [v for row in results["accuracy_matrix"] for v in row], abs=1e-3
    )
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "Continual/Avg" in (run / "log.txt").read_text()
    checkpoint = torch.load(run / "checkpoints" / "after_task1.pt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {"ctx"}
    summary_md = (tmp_path / "runs" / "continual" / "summary.md").read_text()
    assert "| datasets-eurosat+dtd-order1-2shot | coop+kg+ewc | 1 |" in summary_md

    written = (run / "results.json").stat().st_mtime_ns
    assert run_benchmark.main(argv) == 0
    assert (run / "results.json").stat().st_mtime_ns == written

    # Complete results of other settings are neither skipped nor overwritten without --force.
    assert run_benchmark.main([*argv, "--set", "ewc.ewc_lambda=5", "--epochs", "2"]) == 2
    assert "contains complete results of other settings" in caplog.text
    assert "train.epochs: stored 1, requested 2" in caplog.text
    assert "ewc.ewc_lambda: stored 10.0, requested 5.0" in caplog.text
    assert (run / "results.json").stat().st_mtime_ns == written


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--plugins", "lwf,separate_prompts"], "cannot be combined"),
        (["--stream", "class-incremental", "--dataset", "dtd"], "needs --classes-per-step"),
        (["--set", "lwf.alpha=2"], "does not select"),
        (["--stream", "mtil", "--dataset", "dtd"], "--dataset is for"),
    ],
)
def test_cli_rejects_bad_options(data_root: Path, tmp_path: Path, caplog, options: list[str], message: str) -> None:
    common = ["--model", "toy-clip", "--pretrained", "none", "--data-root", str(data_root), "--output-dir", str(tmp_path)]

    assert run_benchmark.main(["continual", *options, *common]) == 2
    assert message in caplog.text


def test_class_incremental_zero_shot_run(data_root: Path, tmp_path: Path) -> None:
    settings = ContinualSettings(
        run=RunSettings(method="zeroshot", seed=1, shots=None, data_root=data_root, output_dir=tmp_path,
                        model="toy-clip", pretrained="none", cache_dir=tmp_path / "cache", progress=False),
        stream=StreamSpec(kind="class-incremental", datasets=("fgvc_aircraft",), classes_per_step=3),
    )
    results = run_continual(settings)
    matrix = results["accuracy_matrix"]

    assert results["dataset"] == "class-incremental-fgvc_aircraft-b3-inc3-seed1993-current-full"
    assert [t["num_classes"] for t in results["tasks"]] == [3, 4]
    assert matrix[0][1] is None
    assert matrix[1][1] is None
    assert None not in matrix[2]
    correct = sum(results["correct_matrix"][2])
    assert results["last"] == pytest.approx(100.0 * correct / 7)
    assert results["transfer"] is None
    assert results["train_seconds"] == 0.0
    assert sorted(results["class_order"]) == list(range(7))
    assert (Path(tmp_path) / "continual" / results["dataset"] / "zeroshot" / "seed1" / "model.pt").is_file()


def test_evaluation_reads_cached_features(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    from strategies import feature_cache

    encoded = []
    original = feature_cache.FeatureCache._encode

    def counting(self, learner, source, dataset, rows):
        encoded.append(len(rows))
        return original(self, learner, source, dataset, rows)

    monkeypatch.setattr(feature_cache.FeatureCache, "_encode", counting)

    def settings(cache: bool, out: Path) -> ContinualSettings:
        return ContinualSettings(
            run=RunSettings(method="coop", seed=1, shots=2, data_root=data_root, output_dir=out, model="toy-clip",
                            pretrained="none", epochs=1, batch_size=4, cache_dir=out / "cache", progress=False,
                            train_overrides={"feature_cache": cache}),
            stream=StreamSpec(kind="datasets", datasets=("eurosat", "dtd")),
        )

    cached = run_continual(settings(True, tmp_path / "cached"))
    assert cached["eval_from_feature_cache"] is True
    assert encoded == [5, 5]  # each test set once, although the 3 evaluation points read both

    images = run_continual(settings(False, tmp_path / "images"))
    assert images["eval_from_feature_cache"] is False
    assert encoded == [5, 5]
    assert cached["correct_matrix"] == images["correct_matrix"]
    assert cached["epochs"] == images["epochs"]

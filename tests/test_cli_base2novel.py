"""run_benchmark.py base2novel end to end on the built-in digits dataset."""

from __future__ import annotations

import json

import pytest

import run_benchmark


def _args(env, tmp_path, *extra):
    return [
        "base2novel",
        "--data-root", str(env["data_root"]),
        "--cache-dir", str(env["cache_dir"]),
        "--output-dir", str(tmp_path / "runs"),
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow
def test_coop_base2novel_on_digits(digits_env, tmp_path):
    status = run_benchmark.main(_args(digits_env, tmp_path, "--epochs", "3", "--shots", "4", "--seeds", "1", "2"))
    assert status == 0
    for seed in (1, 2):
        path = tmp_path / "runs" / "base2novel" / "digits" / "coop" / f"seed{seed}" / "results.json"
        results = json.loads(path.read_text())
        assert results["complete"] is True
        for key in ("base_accuracy", "novel_accuracy", "harmonic_mean"):
            assert 0.0 <= results[key] <= 100.0
        assert results["num_base_classes"] == 5
        assert results["num_novel_classes"] == 5
        assert results["num_train_images"] == 5 * 4
        assert results["trainable_params"] == 4 * 64
        assert len(results["epochs"]) == 3
        assert results["config"]["train"]["epochs"] == 3
        assert results["config"]["method"]["ctx_init"] == "a photo of a"
        assert results["peak_memory_bytes"] > 0
        assert results["train_seconds"] > 0
        assert not (path.parent / "last.pt").exists()
        assert (path.parent / "model.pt").exists()
    summary = json.loads((tmp_path / "runs" / "base2novel" / "summary.json").read_text())
    average = summary["averages"][0]
    assert average["dataset"] == "average"
    assert (tmp_path / "runs" / "base2novel" / "summary.md").read_text().startswith("# base2novel summary")


@pytest.mark.slow
def test_zero_shot_on_digits_is_far_above_chance(digits_env, tmp_path):
    assert run_benchmark.main(_args(digits_env, tmp_path, "--method", "zeroshot")) == 0
    results = json.loads((tmp_path / "runs/base2novel/digits/zeroshot/seed1/results.json").read_text())
    # 5-way classification in each half: chance is 20 %.
    assert results["base_accuracy"] > 50.0
    assert results["novel_accuracy"] > 50.0


@pytest.mark.slow
def test_epochs_zero_evaluates_initialization(digits_env, tmp_path):
    assert run_benchmark.main(_args(digits_env, tmp_path, "--epochs", "0")) == 0
    coop = json.loads((tmp_path / "runs/base2novel/digits/coop/seed1/results.json").read_text())
    assert run_benchmark.main(_args(digits_env, tmp_path, "--method", "zeroshot")) == 0
    zeroshot = json.loads((tmp_path / "runs/base2novel/digits/zeroshot/seed1/results.json").read_text())
    # CoOp initialized from "a photo of a" is zero-shot CLIP with the template "a photo of a {}.";
    # the digits template differs, so only the shape of the result is comparable here.
    assert coop["epochs"] == []
    assert coop["train_seconds"] == 0.0
    assert coop["num_base_test_images"] == zeroshot["num_base_test_images"]


@pytest.mark.slow
def test_complete_runs_are_skipped_unless_forced(digits_env, tmp_path, caplog):
    args = _args(digits_env, tmp_path, "--epochs", "0")
    assert run_benchmark.main(args) == 0
    path = tmp_path / "runs/base2novel/digits/coop/seed1/results.json"
    first = path.stat().st_mtime_ns
    assert run_benchmark.main(args) == 0
    assert path.stat().st_mtime_ns == first
    assert run_benchmark.main([*args, "--force"]) == 0
    assert path.stat().st_mtime_ns != first


def test_unknown_names_are_rejected_with_valid_ones(tmp_path, caplog):
    assert run_benchmark.main(["base2novel", "--method", "cop", "--output-dir", str(tmp_path)]) == 2
    assert "unknown method 'cop'. Did you mean 'coop'" in caplog.text
    caplog.clear()
    assert run_benchmark.main(["base2novel", "--dataset", "eurosats", "--output-dir", str(tmp_path)]) == 2
    assert "unknown dataset 'eurosats'" in caplog.text
    assert "Did you mean eurosat" in caplog.text
    caplog.clear()
    assert run_benchmark.main(["base2novel", "--set", "n_ctx=abc", "--output-dir", str(tmp_path)]) == 2
    assert "method.n_ctx expects an integer, got 'abc'" in caplog.text


def test_digits_weights_need_toy_clip(tmp_path, caplog):
    status = run_benchmark.main(
        ["base2novel", "--model", "ViT-B-16", "--pretrained", "digits", "--output-dir", str(tmp_path), "--data-root", str(tmp_path)]
    )
    assert status == 2
    assert "--pretrained digits provides weights for --model toy-clip only" in caplog.text


def test_digits_dataset_built_on_first_use(tmp_path):
    data_root = tmp_path / "fresh-data"
    status = run_benchmark.main(
        ["base2novel", "--pretrained", "none", "--epochs", "0", "--shots", "1", "--no-progress",
         "--data-root", str(data_root), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs")]
    )
    assert status == 0
    assert (data_root / "digits" / "split_zhou_Digits.json").is_file()
    assert (tmp_path / "runs/base2novel/digits/coop/seed1/results.json").is_file()


def test_complete_run_with_other_settings_is_not_skipped(tmp_path, caplog):
    args = ["base2novel", "--pretrained", "none", "--shots", "1", "--no-progress", "--data-root", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs")]
    assert run_benchmark.main([*args, "--epochs", "0"]) == 0
    path = tmp_path / "runs/base2novel/digits/coop/seed1/results.json"
    first = path.read_bytes()
    assert run_benchmark.main([*args, "--epochs", "1", "--set", "n_ctx=4"]) == 2
    assert "contains complete results of other settings (train.epochs: stored 0, requested 1)" in caplog.text
    assert "pass --force to overwrite them" in caplog.text
    assert path.read_bytes() == first
    assert run_benchmark.main([*args, "--epochs", "1", "--force"]) == 0
    assert json.loads(path.read_text())["config"]["train"]["epochs"] == 1

    # Leaving an option out requests its default, which differs from the stored value too.
    caplog.clear()
    assert run_benchmark.main(args) == 2
    assert "train.epochs: stored 1, requested 200" in caplog.text


def test_invalid_device_is_rejected(tmp_path, caplog):
    args = ["base2novel", "--pretrained", "none", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path)]
    assert run_benchmark.main([*args, "--device", "gpu"]) == 2
    assert "invalid --device 'gpu'" in caplog.text
    assert "use cpu, cuda or cuda:N" in caplog.text

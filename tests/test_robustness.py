"""Bad input, interruption and numerical faults: clear errors, nothing lost, resumable runs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_benchmark
from learners.io import write_json
from tests.process_support import wait_for_path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("base_accuracy", "novel_accuracy", "harmonic_mean", "trainable_params", "num_train_images")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    from benchmarks import build_digits

    root = tmp_path_factory.mktemp("digits")
    build_digits(root)
    return root


def _args(root, out, *extra):
    return [
        "base2novel", "--model", "toy-clip", "--pretrained", "none", "--data-root", str(root),
        "--cache-dir", str(out / "cache"), "--output-dir", str(out / "runs"), "--no-progress", "--shots", "4",
        *extra,
    ]


def _results(out) -> dict:
    return json.loads((out / "runs/base2novel/digits/coop/seed1/results.json").read_text())


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(digits_root, tmp_path):
    for name in ("a", "b"):
        assert run_benchmark.main(_args(digits_root, tmp_path / name, "--epochs", "2", "--batch-size", "4")) == 0
    first, second = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert {k: first[k] for k in METRICS} == {k: second[k] for k in METRICS}
    assert [e["loss"] for e in first["epochs"]] == [e["loss"] for e in second["epochs"]]


@pytest.mark.slow
def test_non_finite_loss_stops_training(digits_root, tmp_path, caplog):
    # Epoch 1 runs at the warmup LR (1e-5); epoch 2 at 1e30 drives the context to inf.
    status = run_benchmark.main(_args(digits_root, tmp_path, "--epochs", "3", "--batch-size", "4", "--set", "train.lr=1e30"))
    assert status == 2
    message = caplog.text
    assert "non-finite loss" in message
    assert "at epoch 2, step" in message
    assert "terms: ce=" in message
    assert "precision fp32" in message
    last = tmp_path / "runs/base2novel/digits/coop/seed1/last.pt"
    assert f"the last good checkpoint is kept at {last}" in message
    assert last.is_file()
    assert not (last.parent / "results.json").exists()

    caplog.clear()
    status = run_benchmark.main(_args(digits_root, tmp_path, "--epochs", "5", "--batch-size", "4", "--set", "train.lr=1e30", "--resume"))
    assert status == 2
    assert f"cannot resume from {last}" in caplog.text
    assert "epochs (checkpoint 3, now 5)" in caplog.text


@pytest.mark.slow
def test_killed_run_resumes_identically(digits_root, tmp_path):
    extra = ("--epochs", "4", "--batch-size", "1")
    assert run_benchmark.main(_args(digits_root, tmp_path / "reference", *extra)) == 0
    reference = _results(tmp_path / "reference")

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "run_benchmark.py"), *_args(digits_root, out, *extra)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "runs/base2novel/digits/coop/seed1/last.pt"
    wait_for_path(checkpoint, process, timeout=600)
    time.sleep(0.3)  # into the next epoch: 20 steps of batch 1 per epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert checkpoint.is_file()
    assert not (checkpoint.parent / "results.json").exists()

    assert run_benchmark.main([*_args(digits_root, out, *extra), "--resume"]) == 0
    # A kill during a write may leave a temporary file; the next run removes it.
    assert not list(checkpoint.parent.rglob(".*.tmp"))
    resumed = _results(out)
    assert {k: resumed[k] for k in METRICS} == {k: reference[k] for k in METRICS}
    assert [e["loss"] for e in resumed["epochs"]] == pytest.approx([e["loss"] for e in reference["epochs"]], rel=0, abs=0)


@pytest.mark.slow
def test_unreadable_image_raise_or_skip(tmp_path, caplog):
    from benchmarks import build_digits

    root = tmp_path / "data"
    dataset_dir = build_digits(root)
    split = json.loads((dataset_dir / "split_zhou_Digits.json").read_text())
    broken = dataset_dir / "images" / split["test"][0][0]
    broken.write_bytes(b"\x89PNG truncated")

    assert run_benchmark.main(_args(root, tmp_path / "raise", "--epochs", "0")) == 2
    assert str(broken) in caplog.text

    assert run_benchmark.main(_args(root, tmp_path / "skip", "--epochs", "0", "--on-bad-image", "skip")) == 0
    results = _results(tmp_path / "skip")
    assert results["skipped_images"] == 1
    assert results["skipped_image_paths"] == [str(broken)]


def test_missing_data_folders_named(tmp_path, caplog):
    def run(root):
        return run_benchmark.main(
            ["base2novel", "--dataset", "eurosat", "--model", "toy-clip", "--pretrained", "none",
             "--data-root", str(root), "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
        )

    missing = tmp_path / "nowhere"
    assert run(missing) == 2
    assert f"Data root {missing} is missing" in caplog.text
    assert "eurosat/2750/<class>/<image>" in caplog.text
    caplog.clear()
    (tmp_path / "data").mkdir()
    assert run(tmp_path / "data") == 2
    assert str(tmp_path / "data" / "eurosat") in caplog.text
    assert "split_zhou_EuroSAT.json" in caplog.text


def test_next_run_removes_stale_temporaries(digits_root, tmp_path, caplog):
    folder = tmp_path / "runs/base2novel/digits/coop/seed1"
    (folder / "checkpoints").mkdir(parents=True)
    stale = [folder / ".last.pt.x1y2.tmp", folder / "checkpoints" / ".model.pt.a3b4.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    caplog.set_level(logging.INFO)

    assert run_benchmark.main(_args(digits_root, tmp_path, "--epochs", "0")) == 0

    assert not any(path.exists() for path in stale)
    assert "removed 2 temporary files of interrupted writes" in caplog.text
    assert _results(tmp_path)["complete"] is True


def test_atomic_write_keeps_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"complete": True})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"complete": False, "bad": Unserializable()})
    assert json.loads(path.read_text()) == {"complete": True}
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_writes_get_the_umask_permissions(tmp_path):
    import stat

    from benchmarks._io import write_json_atomic

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_json_atomic(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644

"""``run_benchmark.py federated --resume`` after a kill or Ctrl-C.

A resumed run continues from its round checkpoint and ends with the results of an uninterrupted
run. Clients find their local state again, and checkpoints of other settings are rejected.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_benchmark
from strategies import fl_apps
from strategies.federated import FederatedSettings
from strategies.fl_resume import CLIENT_STATE_DIR, RESUME_FILE, ClientStateFile
from tests.fixtures.coop_layouts import make_dataset
from tests.process_support import wait_for_path

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = (
    "round", "clients_sampled", "clients_succeeded", "aggregated", "train_loss", "train_loss_per_client",
    "train_terms", "local_accuracy_per_client", "local_accuracy_mean", "global_accuracy", "per_dataset",
    "bytes_sent", "bytes_received",
)
"""Every field of a round row except ``seconds``."""


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A 6-class fake Caltech101 with 4 train and 3 test images per class."""
    root = tmp_path_factory.mktemp("fl_resume_data")
    make_dataset("caltech101", root, num_classes=6, per_class=(4, 1, 3))
    return root


def _args(root: Path, out: Path, *extra: str, method: str = "coop", strategy: str = "fedadam") -> list[str]:
    # Runs compared for equal byte counts need output folders of equal length: the train
    # messages carry the paths.
    return [
        "federated", "--method", method, "--dataset", "caltech101", "--partition", "fedotp", "--clients", "3",
        "--fraction", "0.67", "--shots", "4", "--batch-size", "2", "--local-epochs", "1", "--pretrained", "none",
        "--strategy", strategy, "--backend", "inprocess", "--data-root", str(root), "--cache-dir", str(out / "cache"),
        "--output-dir", str(out / "runs"), "--log-level", "WARNING", *extra,
    ]


def _run_folder(out: Path, method: str = "coop", strategy: str = "fedadam", rounds: int = 4) -> Path:
    return out / f"runs/federated/caltech101/{method}/fedotp-c3-f0.67-{strategy}-s4-r{rounds}e1/seed1"


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _rows(results: dict) -> list[dict]:
    return [{key: row[key] for key in ROW_KEYS} for row in results["rounds"]]


def _final_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "global_state.pt", weights_only=False)["state"]


def _interrupt_round(monkeypatch, interrupted_round: int, call: int = 1) -> None:
    """Make the ``call``-th client training of ``interrupted_round`` raise KeyboardInterrupt (a
    Ctrl-C in the middle of the round), after the earlier clients of that round saved their state."""
    real_train = fl_apps.local_train
    calls = []

    def interrupted_train(plan, partition, client_id, global_state, local_state, server_round, **kwargs):
        if server_round == interrupted_round:
            calls.append(client_id)
            if len(calls) == call:
                raise KeyboardInterrupt
        return real_train(plan, partition, client_id, global_state, local_state, server_round=server_round, **kwargs)

    monkeypatch.setattr(fl_apps, "local_train", interrupted_train)


@pytest.mark.slow
def test_killed_run_resumes_identically(fake_root, tmp_path):
    extra = ("--rounds", "4")
    assert run_benchmark.main(_args(fake_root, tmp_path / "reference", *extra)) == 0
    reference_folder = _run_folder(tmp_path / "reference")
    reference = _results(reference_folder)
    sampled = [tuple(sorted(row["train_loss_per_client"])) for row in reference["rounds"]]
    assert len(set(sampled)) > 1  # the sampling draws new clients each round, so its state matters

    out = tmp_path / "killedrun"
    folder = _run_folder(out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "run_benchmark.py"), *_args(fake_root, out, *extra)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_path(folder / RESUME_FILE, process, timeout=300)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed = _results(folder)
    assert killed["complete"] is False
    assert 1 <= killed["rounds_completed"] < 4

    assert run_benchmark.main([*_args(fake_root, out, *extra), "--resume"]) == 0
    resumed = _results(folder)
    assert resumed["complete"] is True
    assert resumed["rounds_resumed"] >= 1
    assert resumed["initial"] == reference["initial"]
    assert _rows(resumed) == _rows(reference)
    assert resumed["global_accuracy"] == reference["global_accuracy"]
    final, expected = _final_state(folder), _final_state(reference_folder)
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    assert not (folder / RESUME_FILE).exists()
    assert not list(folder.rglob(".*.tmp"))


@pytest.mark.slow
def test_plotpp_local_state_survives_resume(fake_root, tmp_path, monkeypatch):
    # PLOT++ keeps its training stage (vision, then joint after epoch 2 of 4) on each client as
    # local state, so a client that lost it would train round 3 in the vision stage again.
    options = dict(method="plotpp", strategy="fedavgm")
    extra = ("--rounds", "4", "--strategy-option", "server_momentum=0.9")
    assert run_benchmark.main(_args(fake_root, tmp_path / "reference", *extra, **options)) == 0
    reference = _results(_run_folder(tmp_path / "reference", **options))

    out = tmp_path / "interrupt"
    folder = _run_folder(out, **options)
    with monkeypatch.context() as patch:
        _interrupt_round(patch, interrupted_round=3, call=2)
        assert run_benchmark.main(_args(fake_root, out, *extra, **options)) == 130
    assert _results(folder)["rounds_completed"] == 2
    state_files = sorted(p.name for p in (folder / CLIENT_STATE_DIR).iterdir())
    assert state_files == ["client0.pt", "client1.pt", "client2.pt"]

    assert run_benchmark.main([*_args(fake_root, out, *extra, **options), "--resume"]) == 0
    resumed = _results(folder)
    assert resumed["rounds_resumed"] == 2
    assert _rows(resumed) == _rows(reference)
    assert not (folder / CLIENT_STATE_DIR).exists()


def test_client_state_file_repeats_a_round(tmp_path):
    state_file = ClientStateFile(tmp_path / "client0.pt", run_token="a")
    assert state_file.load(latest_round=5) is None
    state_file.save(1, {"stage": torch.tensor(0)})
    state_file.save(3, {"stage": torch.tensor(1)})
    state_file.save(4, {"stage": torch.tensor(2)})

    # Round 4 is repeated after a resume: its input is the state after round 3.
    assert int(state_file.load(latest_round=3)["stage"]) == 1
    assert int(state_file.load(latest_round=4)["stage"]) == 2
    assert state_file.load(latest_round=2) is None  # only the last two rounds are kept
    state_file.save(4, {"stage": torch.tensor(7)})
    assert int(state_file.load(latest_round=4)["stage"]) == 7
    assert int(state_file.load(latest_round=3)["stage"]) == 1

    other_run = ClientStateFile(tmp_path / "client0.pt", run_token="b")
    assert other_run.load(latest_round=4) is None


@pytest.mark.slow
def test_resume_with_other_settings_is_rejected(fake_root, tmp_path, monkeypatch, caplog):
    extra = ("--rounds", "2")
    folder = _run_folder(tmp_path, rounds=2)
    checkpoint = folder / RESUME_FILE
    with monkeypatch.context() as patch:
        _interrupt_round(patch, interrupted_round=2)
        assert run_benchmark.main(_args(fake_root, tmp_path, *extra)) == 130
    assert checkpoint.is_file()

    caplog.clear()
    assert run_benchmark.main([*_args(fake_root, tmp_path, *extra), "--lr", "0.5", "--resume"]) == 2
    assert f"cannot resume from {checkpoint}" in caplog.text
    assert "other settings: lr (checkpoint default, now 0.5)" in caplog.text
    assert "Resume with the same options, or rerun without --resume to start over" in caplog.text
    assert checkpoint.is_file()

    caplog.clear()
    assert run_benchmark.main(_args(fake_root, tmp_path, *extra)) == 0
    assert f"{checkpoint} is the round checkpoint of an interrupted run; starting over" in caplog.text
    results = _results(folder)
    assert results["complete"] is True
    assert results["rounds_resumed"] == 0
    assert not checkpoint.exists()

    # Complete results of other settings (the learning rate is not in the folder name) are kept.
    caplog.clear()
    assert run_benchmark.main([*_args(fake_root, tmp_path, *extra), "--lr", "0.5"]) == 2
    assert "contains complete results of other settings" in caplog.text
    assert "lr: stored 'default', requested 0.5" in caplog.text
    assert "train.lr: stored 0.001, requested 0.5" in caplog.text
    assert _results(folder) == results


def test_resume_without_checkpoint_starts_over(fake_root, tmp_path, caplog):
    caplog.set_level("INFO", logger="strategies.fl_apps")
    args = [*_args(fake_root, tmp_path, "--rounds", "1"), "--resume"]
    assert run_benchmark.main(args) == 0
    folder = _run_folder(tmp_path, rounds=1)
    assert f"no round checkpoint at {folder / RESUME_FILE}; starting from round 1" in caplog.text
    assert _results(folder)["rounds_resumed"] == 0


def test_resume_run_config_values():
    settings = FederatedSettings(resume=True, client_state_dir="/var/lib/vlprompt/clients")
    assert FederatedSettings.from_run_config(settings.to_run_config()) == settings
    assert FederatedSettings.from_run_config({"resume": "true"}).resume is True
    assert FederatedSettings.from_run_config({"resume": False}).resume is False
    with pytest.raises(ValueError, match="run config key 'resume': expected true or false, got 'yes'"):
        FederatedSettings.from_run_config({"resume": "yes"})

"""Continual runs stopped after any checkpoint and resumed end as uninterrupted runs do."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_benchmark
from benchmarks.continual import StreamSpec
from plugins.registry import parse_plugin_overrides, plugin_names
from strategies.continual import ContinualSettings, run_continual
from strategies.experiment import RunSettings
from strategies.prompt_strategy import PromptStrategy
from tests.fixtures.coop_layouts import make_dataset
from tests.process_support import wait_for_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUN = Path("continual/datasets-eurosat+dtd-order1-2shot")
# Values that must match exactly. Times and memory differ between runs.
EXACT = ("accuracy_matrix", "correct_matrix", "total_matrix", "avg", "last", "forgetting", "bwt", "loss_terms")


class Stopped(BaseException):
    """Stands in for a kill right after a checkpoint was written."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("continual_resume_data")
    for name in ("eurosat", "dtd"):
        make_dataset(name, root, per_class=(2, 0, 1))
    return root


def make_settings(data_root: Path, out: Path, plugins: tuple[str, ...], resume: bool = False,
                  pairs: tuple[str, ...] = (), method: str = "coop") -> ContinualSettings:
    run = RunSettings(method=method, seed=1, shots=2, data_root=data_root, output_dir=out, model="toy-clip",
                      pretrained="none", epochs=2, batch_size=2, cache_dir=out / "cache", progress=False, resume=resume)
    names = plugin_names(list(plugins))
    return ContinualSettings(run=run, stream=StreamSpec(kind="datasets", datasets=("eurosat", "dtd")),
                             plugins=tuple(names), plugin_overrides=parse_plugin_overrides(list(pairs), names))


def stop_after_checkpoint(monkeypatch, count: int) -> None:
    """Raise :class:`Stopped` right after the ``count``-th ``last.pt`` write."""
    original = PromptStrategy.save_training_state
    written = []

    def save(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        written.append(path)
        if len(written) == count:
            raise Stopped(path)

    monkeypatch.setattr(PromptStrategy, "save_training_state", save)


def exact(results: dict) -> dict:
    return {**{k: results[k] for k in EXACT}, "epochs": results["epochs"]}


@pytest.fixture(scope="module")
def references(data_root, tmp_path_factory):
    """Uninterrupted results per plugin set, computed once."""
    cache: dict[tuple[str, ...], dict] = {}

    def get(plugins: tuple[str, ...]) -> dict:
        if plugins not in cache:
            out = tmp_path_factory.mktemp("reference")
            cache[plugins] = run_continual(make_settings(data_root, out, plugins))
        return cache[plugins]

    return get


# 2 tasks x 2 epochs write last.pt 6 times: after epochs 1 and 2 and after the evaluation, per task.
@pytest.mark.parametrize(
    ("plugins", "stop"),
    [
        (("lwf", "ewc", "replay"), 2),  # after task 1's last epoch, before its evaluation
        (("lwf", "ewc", "replay"), 3),  # between the tasks
        (("lwf", "ewc", "replay"), 4),  # inside task 2, with every plugin's state in use
        (("lwf", "ewc", "replay"), 6),  # after the last task's evaluation, before the final files
        (("separate_prompts",), 4),
        (("gpa", "kg"), 4),
    ],
)
def test_stopped_run_resumes_to_the_same_results(data_root, tmp_path, monkeypatch, references, plugins, stop) -> None:
    reference = references(plugins)
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, stop)
        with pytest.raises(Stopped):
            run_continual(make_settings(data_root, tmp_path, plugins))
    folder = tmp_path / RUN / "+".join(("coop", *plugins)) / "seed1"
    assert (folder / "last.pt").is_file()

    resumed = run_continual(make_settings(data_root, tmp_path, plugins, resume=True))

    assert exact(resumed) == exact(reference)
    assert resumed["resumed_from"]["tasks_done"] == stop // 3
    assert not (folder / "last.pt").exists()


def test_without_resume_a_stopped_run_starts_over(data_root, tmp_path, monkeypatch, references, caplog) -> None:
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 4)
        with pytest.raises(Stopped):
            run_continual(make_settings(data_root, tmp_path, ("ewc",)))

    results = run_continual(make_settings(data_root, tmp_path, ("ewc",)))

    assert "checkpoint of an interrupted run; starting over" in caplog.text
    assert results["resumed_from"] is None
    assert exact(results) == exact(references(("ewc",)))


def test_resume_with_other_settings_is_refused(data_root, tmp_path, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 1)
        with pytest.raises(Stopped):
            run_continual(make_settings(data_root, tmp_path, ("ewc",)))
    last = tmp_path / RUN / "coop+ewc" / "seed1" / "last.pt"

    with pytest.raises(ValueError) as plugin_change:
        run_continual(make_settings(data_root, tmp_path, ("ewc",), resume=True, pairs=("ewc.ewc_lambda=5",)))
    message = str(plugin_change.value)
    assert f"cannot resume from {last}" in message
    assert "other continual settings: plugins" in message
    assert "'ewc_lambda': 100.0" in message
    assert "'ewc_lambda': 5.0" in message
    assert "rerun without --resume" in message

    other_epochs = make_settings(data_root, tmp_path, ("ewc",), resume=True)
    other_epochs = dataclasses.replace(other_epochs, run=dataclasses.replace(other_epochs.run, epochs=3))
    with pytest.raises(ValueError, match=r"other training settings: epochs \(checkpoint 2, now 3\)"):
        run_continual(other_epochs)
    assert last.is_file()


def test_unreadable_checkpoint_is_reported(data_root, tmp_path) -> None:
    folder = tmp_path / RUN / "coop" / "seed1"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"not a checkpoint")

    with pytest.raises(ValueError, match=r"cannot resume from .*last\.pt: the file is unreadable .*Delete it"):
        run_continual(make_settings(data_root, tmp_path, (), resume=True))
    assert (folder / "last.pt").read_bytes() == b"not a checkpoint"


def test_killed_cli_run_resumes_identically(data_root, tmp_path) -> None:
    def argv(out: Path) -> list[str]:
        return [
            "continual", "--method", "coop", "--datasets", "eurosat,dtd", "--plugins", "lwf,replay",
            "--model", "toy-clip", "--pretrained", "none", "--epochs", "3", "--batch-size", "1", "--shots", "2",
            "--data-root", str(data_root), "--cache-dir", str(out / "cache"), "--output-dir", str(out / "runs"),
            "--no-progress", "--log-level", "WARNING",
        ]

    assert run_benchmark.main(argv(tmp_path / "reference")) == 0
    folder = Path("runs") / RUN / "coop+lwf+replay" / "seed1"
    reference = json.loads((tmp_path / "reference" / folder / "results.json").read_text())

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "run_benchmark.py"), *argv(out)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # The first task's evaluation writes the partial results; the kill lands in the second task.
    wait_for_path(out / folder / "checkpoints" / "after_task1.pt", process, timeout=600)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (out / folder / "last.pt").is_file()
    partial = json.loads((out / folder / "results.json").read_text())
    assert partial["complete"] is False

    assert run_benchmark.main([*argv(out), "--resume"]) == 0
    assert not list((out / folder).rglob(".*.tmp"))
    resumed = json.loads((out / folder / "results.json").read_text())
    assert resumed["complete"] and resumed["resumed_from"] is not None
    assert exact(resumed) == exact(reference)
    assert (out / folder / "csv-resumed1" / "eval_results.csv").is_file()


"""Few-shot, cross-dataset and domain-generalization runs end to end on fake CoOp layouts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from benchmarks import read_dataset
from run_benchmark import main
from strategies import protocols
from strategies.experiment import RunSettings, resolve_configs, run_dir
from strategies.protocols import (
    DOMAIN_GENERALIZATION_TARGETS,
    class_set,
    default_targets,
    evaluate_split,
    read_fewshot,
    results_complete,
    train_learner,
)
from tests.fixtures.coop_layouts import imagenet_subset_indices, make_dataset, make_imagenet_family

NUM_CLASSES = 5
PER_CLASS = (4, 2, 3)  # train, val, test images per class


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The toy model's tensors are tiny, so several threads per op only contend with other
    # processes. Measured on a loaded 2-core machine: a domain-generalization run took 24 s with
    # the default threads and 1.1 s with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name in ("caltech101", "dtd", "eurosat"):
        make_dataset(name, root, num_classes=NUM_CLASSES, per_class=PER_CLASS)
    make_imagenet_family(root, num_classes=NUM_CLASSES, per_class=PER_CLASS)
    return root


def cli(protocol: str, data_root: Path, out: Path, *extra: str) -> int:
    return main([protocol, "--model", "toy-clip", "--pretrained", "none", "--epochs", "1", "--data-root", str(data_root),
                 "--cache-dir", str(out / "cache"), "--output-dir", str(out / "runs"), "--no-progress",
                 "--log-level", "WARNING", *extra])


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Pieces


def test_fewshot_epoch_schedule():
    settings = RunSettings(method="coop")
    assert [resolve_configs(settings, "dtd", k)[1].epochs for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    # The reference trains ImageNet for 50 epochs at every shot count.
    assert [resolve_configs(settings, "imagenet", k)[1].epochs for k in (1, 16)] == [50, 50]
    assert resolve_configs(RunSettings(method="coop", epochs=3), "dtd", 1)[1].epochs == 3


def test_published_protocol_configs():
    def resolve(method: str, dataset: str, protocol: str, **run) -> tuple:
        return resolve_configs(RunSettings(method=method, **run), dataset, None, protocol)

    maple, maple_train = resolve("maple", "imagenet", "transfer")
    assert (maple.depth, maple_train.epochs, maple_train.lr) == (3, 2, 0.0026)
    maple, maple_train = resolve("maple", "imagenet", "base2novel")
    assert (maple.depth, maple_train.epochs, maple_train.lr) == (9, 5, 0.0035)

    src, src_train = resolve("promptsrc", "imagenet", "transfer")
    assert (src.depth_text, src.depth_vision, src.gpa_mean, src.gpa_std, src_train.epochs) == (3, 3, 6.0, 10.0, 20)
    src, src_train = resolve("promptsrc", "caltech101", "fewshot")
    assert (src.gpa_mean, src.gpa_std, src_train.epochs) == (30.0, 30.0, 50)
    src, _ = resolve("promptsrc", "fgvc_aircraft", "fewshot")
    assert (src.gpa_mean, src.gpa_std) == (45.0, 5.0)

    # BIP's transfer schedule wins over its ImageNet dataset override (25 epochs, batch 128).
    _, bip_train = resolve("bip", "imagenet", "transfer")
    assert (bip_train.epochs, bip_train.batch_size) == (3, 128)

    # The user's values win over every published one.
    maple, maple_train = resolve("maple", "imagenet", "transfer", epochs=7, method_overrides={"depth": 5})
    assert (maple.depth, maple_train.epochs) == (5, 7)


def test_protocol_overrides_reject_unknown_protocol():
    from learners import ProtocolOverrides, TrainConfig, register_method

    with pytest.raises(ValueError, match=r"unknown protocols \['cross'\] in protocol_overrides; valid protocols: \['base2novel', 'fewshot', 'transfer'\]"):
        register_method("nothing", object, TrainConfig(), protocol_overrides={"cross": ProtocolOverrides()})


def test_fewshot_run_dir_has_shots(tmp_path):
    settings = RunSettings(method="coop", dataset="dtd", seed=2, shots=4, output_dir=tmp_path)
    assert run_dir(settings, "fewshot") == tmp_path / "fewshot" / "dtd" / "coop" / "shots4" / "seed2"
    assert run_dir(settings, "base2novel") == tmp_path / "base2novel" / "dtd" / "coop" / "seed2"


def test_default_targets():
    assert default_targets("cross-dataset", "imagenet") == (
        "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
        "eurosat", "ucf101")
    assert "dtd" not in default_targets("cross-dataset", "dtd")
    assert default_targets("domain-generalization", "imagenet") == DOMAIN_GENERALIZATION_TARGETS


def test_results_complete_checks_targets(tmp_path):
    path = tmp_path / "results.json"
    assert not results_complete(path)
    path.write_text(json.dumps({"complete": True, "targets": {"dtd": {"accuracy": 1.0}}}))
    assert results_complete(path, ["dtd"])
    assert not results_complete(path, ["dtd", "eurosat"])
    path.write_text(json.dumps({"complete": False, "targets": {"dtd": {"accuracy": 1.0}}}))
    assert not results_complete(path, ["dtd"])
    path.write_text("{truncated")
    assert not results_complete(path)


def test_subset_variant_scored_over_its_classes(data_root, tmp_path):
    settings = RunSettings(method="coop", dataset="imagenet", shots=1, data_root=data_root, output_dir=tmp_path,
                           model="toy-clip", pretrained="none", epochs=0, progress=False, cache_dir=tmp_path)
    trained = train_learner(settings, read_fewshot(settings, "imagenet"), tmp_path)
    assert len(trained.learner.classes) == NUM_CLASSES
    subset = read_dataset("imagenet_a", data_root)
    metrics = evaluate_split(trained, subset, settings)
    assert trained.learner.classes == class_set(subset)
    assert len(trained.learner.classes) == len(imagenet_subset_indices(NUM_CLASSES))
    assert metrics["num_classes"] == len(imagenet_subset_indices(NUM_CLASSES))
    assert metrics["total"] == len(subset.test)


# ---------------------------------------------------------------------------------------------
# Command line, end to end


@pytest.mark.slow
def test_fewshot_sweep_and_resume(data_root, tmp_path):
    args = ("--dataset", "caltech101", "dtd", "--shots", "1", "2", "--seeds", "1", "2")
    assert cli("fewshot", data_root, tmp_path, *args) == 0

    runs = tmp_path / "runs" / "fewshot"
    paths = sorted(runs.glob("*/coop/shots*/seed*/results.json"))
    assert len(paths) == 8
    for path in paths:
        results = read(path)
        assert results["complete"] is True
        assert results["num_train_images"] == results["shots"] * NUM_CLASSES
        assert results["num_test_images"] == NUM_CLASSES * PER_CLASS[2]
        assert results["num_classes"] == NUM_CLASSES
        assert results["config"]["train"]["epochs"] == 1
        for cost in ("trainable_params", "train_seconds_per_epoch", "eval_images_per_second", "peak_memory_bytes"):
            assert results[cost] > 0, cost
    summary = read(runs / "summary.json")
    assert {(r["dataset"], r["shots"]) for r in summary["rows"]} == {(d, k) for d in ("caltech101", "dtd") for k in (1, 2)}
    assert all(r["seeds"] == [1, 2] for r in summary["rows"])
    assert (runs / "summary.md").is_file()
    assert (runs / "summary.csv").is_file()

    # A killed sweep leaves one run without results.json and one incomplete; only those rerun.
    deleted = runs / "dtd" / "coop" / "shots2" / "seed1" / "results.json"
    incomplete = runs / "caltech101" / "coop" / "shots1" / "seed2" / "results.json"
    deleted.unlink()
    incomplete.write_text(json.dumps({**read(incomplete), "complete": False}))
    before = {path: path.stat().st_mtime_ns for path in paths if path not in (deleted, incomplete)}
    assert cli("fewshot", data_root, tmp_path, *args) == 0
    assert read(deleted)["complete"] is True
    assert read(incomplete)["complete"] is True
    assert {path: path.stat().st_mtime_ns for path in before} == before

    # --force reruns a complete run.
    forced = runs / "dtd" / "coop" / "shots1" / "seed1" / "results.json"
    stamp = forced.stat().st_mtime_ns
    assert cli("fewshot", data_root, tmp_path, "--dataset", "dtd", "--shots", "1", "--force") == 0
    assert forced.stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_sweep_reports_failed_run_and_goes_on(data_root, tmp_path):
    # ucf101 has no folder under the data root, so its run fails; the dtd run still completes.
    status = cli("fewshot", data_root, tmp_path, "--dataset", "ucf101", "dtd", "--shots", "1")
    assert status == 1
    assert read(tmp_path / "runs" / "fewshot" / "dtd" / "coop" / "shots1" / "seed1" / "results.json")["complete"]
    assert not (tmp_path / "runs" / "fewshot" / "ucf101" / "coop" / "shots1" / "seed1" / "results.json").exists()


@pytest.mark.slow
def test_cross_dataset_end_to_end(data_root, tmp_path):
    args = ("--source", "caltech101", "--targets", "dtd", "eurosat", "--shots", "2")
    assert cli("cross-dataset", data_root, tmp_path, *args) == 0
    path = tmp_path / "runs" / "cross-dataset" / "caltech101" / "coop" / "seed1" / "results.json"
    results = read(path)
    assert results["complete"] is True
    assert results["source"] == "caltech101"
    assert results["num_train_images"] == 2 * NUM_CLASSES
    assert results["source_num_test_images"] == NUM_CLASSES * PER_CLASS[2]
    assert set(results["targets"]) == {"dtd", "eurosat"}
    for target in results["targets"].values():
        assert target["num_classes"] == NUM_CLASSES
        assert target["num_test_images"] == NUM_CLASSES * PER_CLASS[2]
        assert 0.0 <= target["accuracy"] <= 100.0
    assert results["average_target_accuracy"] == pytest.approx(
        (results["targets"]["dtd"]["accuracy"] + results["targets"]["eurosat"]["accuracy"]) / 2)
    assert (path.parent / "model.pt").is_file()
    assert not (path.parent / "last.pt").exists()
    summary = read(tmp_path / "runs" / "cross-dataset" / "summary.json")
    assert summary["averages"][0]["datasets"] == ["dtd", "eurosat"]

    # Rerunning with the same targets skips the run; adding a target reruns it.
    stamp = path.stat().st_mtime_ns
    assert cli("cross-dataset", data_root, tmp_path, *args) == 0
    assert path.stat().st_mtime_ns == stamp
    assert cli("cross-dataset", data_root, tmp_path, "--source", "caltech101", "--targets", "dtd", "eurosat",
               "imagenet", "--shots", "2") == 0
    assert set(read(path)["targets"]) == {"dtd", "eurosat", "imagenet"}


@pytest.mark.slow
def test_domain_generalization_end_to_end(data_root, tmp_path):
    assert cli("domain-generalization", data_root, tmp_path, "--shots", "1", "--method", "coop", "zeroshot") == 0
    root = tmp_path / "runs" / "domain-generalization" / "imagenet"
    for method in ("coop", "zeroshot"):
        results = read(root / method / "seed1" / "results.json")
        assert list(results["targets"]) == list(DOMAIN_GENERALIZATION_TARGETS)
        assert results["source_num_classes"] == NUM_CLASSES
        for name in ("imagenetv2", "imagenet_sketch"):
            assert results["targets"][name]["num_classes"] == NUM_CLASSES
        for name in ("imagenet_a", "imagenet_r"):
            assert results["targets"][name]["num_classes"] == len(imagenet_subset_indices(NUM_CLASSES))
            assert results["targets"][name]["num_test_images"] == len(imagenet_subset_indices(NUM_CLASSES)) * PER_CLASS[2]
    assert read(root / "zeroshot" / "seed1" / "results.json")["trainable_params"] == 0
    summary = read(tmp_path / "runs" / "domain-generalization" / "summary.json")
    coop = next(r for r in summary["averages"] if r["method"] == "coop")
    assert coop["published_accuracy"] == 59.28
    assert coop["diff_accuracy"] == pytest.approx(coop["accuracy"] - 59.28)


@pytest.mark.slow
def test_transfer_run_uses_published_config(data_root, tmp_path):
    settings = RunSettings(method="maple", dataset="caltech101", shots=1, data_root=data_root, output_dir=tmp_path,
                           model="toy-clip", pretrained="none", progress=False, cache_dir=tmp_path)

    results = protocols.run_cross_dataset(settings, ["dtd"])

    assert results["config"]["method"]["depth"] == 3
    assert results["config"]["train"]["epochs"] == 2
    assert results["config"]["train"]["lr"] == 0.0026
    assert [epoch["epoch"] for epoch in results["epochs"]] == [1, 2]


@pytest.mark.slow
def test_transfer_resume_skips_finished_training(data_root, tmp_path, monkeypatch):
    settings = RunSettings(method="coop", dataset="caltech101", shots=1, data_root=data_root, output_dir=tmp_path,
                           model="toy-clip", pretrained="none", epochs=2, progress=False, cache_dir=tmp_path)
    out = run_dir(settings, "cross-dataset")

    # Killed while evaluating the targets: training finished and left its epoch checkpoint.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(protocols, "evaluate_split", interrupted)
        with pytest.raises(KeyboardInterrupt):
            protocols.run_cross_dataset(settings, ["dtd"])
    assert (out / "last.pt").is_file()
    assert not (out / "results.json").exists()

    results = protocols.run_cross_dataset(dataclasses.replace(settings, resume=True), ["dtd"])
    assert results["complete"] is True
    assert results["epochs_resumed"] == 2
    assert [epoch["epoch"] for epoch in results["epochs"]] == [1, 2]
    assert results["train_seconds_per_epoch"] is None
    assert not (out / "last.pt").exists()


def test_unknown_target_rejected(data_root, tmp_path):
    assert cli("cross-dataset", data_root, tmp_path, "--source", "caltech101", "--targets", "dtdd") == 2
    assert not (tmp_path / "runs" / "cross-dataset" / "caltech101").exists()

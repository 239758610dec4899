"""Summary arithmetic of every protocol on hand-made results, and the published comparison."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from benchmarks.published import PublishedEntry, PublishedTable
from benchmarks.summary import harmonic_mean, load_results, summarize, to_csv, to_markdown, write_summary

COST = {"trainable_params": 2048, "train_seconds_per_epoch": 2.0, "eval_images_per_second": 100.0,
        "peak_memory_bytes": 2**30, "peak_memory_kind": "cpu_max_rss"}


def b2n(dataset, seed, base, novel, method="coop", **cost):
    return {"complete": True, "protocol": "base2novel", "method": method, "dataset": dataset, "seed": seed,
            "model": "toy-clip", "base_accuracy": base, "novel_accuracy": novel,
            "harmonic_mean": harmonic_mean(base, novel), **{**COST, **cost}}


def fewshot(dataset, shots, seed, accuracy, method="coop"):
    return {"complete": True, "protocol": "fewshot", "method": method, "dataset": dataset, "shots": shots,
            "seed": seed, "model": "toy-clip", "accuracy": accuracy, **COST}


def transfer(seed, source_accuracy, targets, protocol="cross-dataset", method="coop"):
    return {"complete": True, "protocol": protocol, "method": method, "dataset": "imagenet", "source": "imagenet",
            "seed": seed, "model": "toy-clip", "source_accuracy": source_accuracy,
            "targets": {name: {"accuracy": acc, "eval_images_per_second": 50.0} for name, acc in targets.items()},
            **COST}


def entry(method, protocol, dataset, metrics, shots=16, train_dataset=None, checked=True):
    return PublishedEntry(method, protocol, dataset, shots, train_dataset, metrics, 2,
                          "repository" if checked else "paper", "test citation", checked)


def test_base2novel_average_is_hm_of_means():
    results = [b2n("caltech101", 1, 80.0, 40.0), b2n("dtd", 1, 60.0, 80.0)]
    summary = summarize(results, "base2novel")
    average = summary["averages"][0]
    assert average["base_accuracy"] == pytest.approx(70.0)
    assert average["novel_accuracy"] == pytest.approx(60.0)
    # HM(70, 60) = 64.615..., while the mean of the per-dataset HMs (53.33, 68.57) is 60.95.
    assert average["harmonic_mean"] == pytest.approx(2 * 70 * 60 / 130)
    mean_of_hms = (harmonic_mean(80, 40) + harmonic_mean(60, 80)) / 2
    assert abs(average["harmonic_mean"] - mean_of_hms) > 3


def test_base2novel_dataset_hm_of_seed_means():
    results = [b2n("dtd", 1, 90.0, 30.0), b2n("dtd", 2, 50.0, 70.0)]
    row = summarize(results, "base2novel")["rows"][0]
    assert row["base_accuracy"] == pytest.approx(70.0)
    assert row["base_accuracy_std"] == pytest.approx(math.sqrt(800))
    assert row["harmonic_mean"] == pytest.approx(harmonic_mean(70.0, 50.0))
    assert row["seeds"] == [1, 2]


def test_fewshot_mean_std_per_shots():
    results = [fewshot("dtd", 4, seed, acc) for seed, acc in ((1, 50.0), (2, 60.0), (3, 70.0))]
    results += [fewshot("eurosat", 4, 1, 80.0), fewshot("dtd", 1, 1, 20.0)]
    summary = summarize(results, "fewshot")
    rows = {(r["dataset"], r["shots"]): r for r in summary["rows"]}
    assert rows[("dtd", 4)]["accuracy"] == pytest.approx(60.0)
    assert rows[("dtd", 4)]["accuracy_std"] == pytest.approx(10.0)
    assert rows[("dtd", 1)]["accuracy_std"] == 0.0
    averages = {r["shots"]: r for r in summary["averages"]}
    assert averages[4]["accuracy"] == pytest.approx(70.0)
    assert averages[4]["datasets"] == ["dtd", "eurosat"]
    assert averages[1]["accuracy"] == pytest.approx(20.0)


def test_transfer_average_leaves_source_out():
    results = [transfer(1, 70.0, {"dtd": 40.0, "eurosat": 30.0}), transfer(2, 72.0, {"dtd": 44.0, "eurosat": 34.0})]
    summary = summarize(results, "cross-dataset")
    rows = {r["dataset"]: r for r in summary["rows"]}
    assert rows["imagenet"]["role"] == "source"
    assert rows["imagenet"]["accuracy"] == pytest.approx(71.0)
    assert rows["dtd"]["accuracy"] == pytest.approx(42.0)
    assert rows["dtd"]["accuracy_std"] == pytest.approx(math.sqrt(8))
    assert rows["dtd"]["eval_images_per_second"] == 50.0
    average = summary["averages"][0]
    assert average["accuracy"] == pytest.approx(37.0)
    assert average["datasets"] == ["dtd", "eurosat"]


def test_published_difference_and_coverage():
    table = PublishedTable("ViT-B/16", {"base2novel": ("caltech101", "dtd"), "fewshot": (), "cross-dataset": (),
                                        "domain-generalization": ()}, (
        entry("coop", "base2novel", "average", {"base_accuracy": 75.0, "novel_accuracy": 55.0, "harmonic_mean": 63.46}),
        entry("coop", "base2novel", "dtd", {"harmonic_mean": 70.0}, checked=False),
    ))
    results = [b2n("caltech101", 1, 80.0, 40.0), b2n("dtd", 1, 60.0, 80.0)]
    summary = summarize(results, "base2novel", table)
    rows = {r["dataset"]: r for r in summary["rows"]}
    assert rows["dtd"]["published_harmonic_mean"] == 70.0
    assert rows["dtd"]["diff_harmonic_mean"] == pytest.approx(harmonic_mean(60, 80) - 70.0)
    assert rows["dtd"]["published_checked"] is False
    assert "published_base_accuracy" not in rows["dtd"]
    assert "published_source" not in rows["caltech101"]
    average = summary["averages"][0]
    assert average["diff_base_accuracy"] == pytest.approx(-5.0)
    assert average["diff_harmonic_mean"] == pytest.approx(2 * 70 * 60 / 130 - 63.46)

    # Averaged over fewer datasets than the published average: values shown, no difference.
    partial = summarize(results[:1], "base2novel", table)["averages"][0]
    assert partial["published_base_accuracy"] == 75.0
    assert partial["diff_base_accuracy"] is None
    assert "1" in partial["published_note"]


def test_cost_per_method():
    results = [b2n("dtd", 1, 50, 50, peak_memory_bytes=100), b2n("dtd", 2, 50, 50, peak_memory_bytes=300,
                                                                  train_seconds_per_epoch=4.0),
               b2n("dtd", 1, 50, 50, method="zeroshot", trainable_params=0, train_seconds_per_epoch=0.0)]
    costs = {c["method"]: c for c in summarize(results, "base2novel")["cost"]}
    assert costs["coop"]["runs"] == 2
    assert costs["coop"]["peak_memory_bytes"] == 300
    assert costs["coop"]["train_seconds_per_epoch"] == pytest.approx(3.0)
    assert costs["coop"]["trainable_params"] == 2048
    assert costs["zeroshot"]["trainable_params"] == 0


def test_markdown_and_csv_render():
    table = PublishedTable("ViT-B/16", {"base2novel": (), "fewshot": (), "cross-dataset": (),
                                        "domain-generalization": ("dtd",)}, (
        entry("coop", "domain-generalization", "dtd", {"accuracy": 41.0}, train_dataset="imagenet"),
    ))
    results = [transfer(1, 70.0, {"dtd": 40.0}, protocol="domain-generalization")]
    summary = summarize(results, "domain-generalization", table)
    markdown = to_markdown(summary)
    assert "| coop | imagenet | dtd | 1 | 40.00 ± 0.00 | 41.00 | -1.00 | repository, checked |" in markdown
    assert "imagenet (source)" in markdown
    assert "## Cost per method" in markdown
    assert "1024" in markdown  # peak memory in MiB
    rows = list(csv.DictReader(io.StringIO(to_csv(summary))))
    assert [r["dataset"] for r in rows] == ["imagenet", "dtd", "average"]
    assert float(rows[1]["diff_accuracy"]) == pytest.approx(-1.0)


def test_write_summary_reads_complete_files(tmp_path):
    folder = tmp_path / "fewshot" / "dtd" / "coop" / "shots4"
    for seed, accuracy, complete in ((1, 50.0, True), (2, 90.0, False)):
        path = folder / f"seed{seed}" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({**fewshot("dtd", 4, seed, accuracy), "complete": complete}))
    assert len(load_results(tmp_path, "fewshot")) == 1
    paths = write_summary(tmp_path, "fewshot")
    assert [p.name for p in paths] == ["summary.json", "summary.md", "summary.csv", "summary_cost.csv"]
    summary = json.loads(paths[0].read_text())
    assert summary["rows"][0]["accuracy"] == 50.0
    assert summary["published_backbone"] == "ViT-B/16"

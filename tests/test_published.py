"""The published results table shipped in benchmarks/data/published.json."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

import pytest

from benchmarks import DATASETS
from benchmarks.published import AVERAGE, PROTOCOL_METRICS, PublishedEntry, default_published_path, load_published
from benchmarks.summary import harmonic_mean

KNOWN_METHODS = {"zeroshot", "coop", "cocoop", "kgcoop", "maple", "promptsrc", "coprompt", "tcp", "plotpp"}


def _bound(entry: PublishedEntry) -> float:
    """Largest rounding error of a value printed with the entry's decimals."""
    return 0.5 * 10.0 ** -entry.decimals


@pytest.fixture(scope="module")
def table():
    return load_published()


def test_entries_well_formed(table):
    assert len(table.entries) > 100
    for entry in table.entries:
        assert entry.method in KNOWN_METHODS, entry
        assert entry.protocol in PROTOCOL_METRICS, entry
        assert entry.dataset == AVERAGE or entry.dataset in DATASETS, entry
        assert entry.source in ("paper", "repository"), entry
        assert isinstance(entry.checked, bool), entry
        assert entry.citation, entry
        assert entry.metrics, entry
        for name, value in entry.metrics.items():
            assert name in PROTOCOL_METRICS[entry.protocol], entry
            assert 0.0 <= value <= 100.0, entry


def test_checked_follows_trust_tags(table):
    # Values read in a repository README or file are checked; recalled paper values are not.
    for entry in table.entries:
        assert entry.checked == (entry.source == "repository"), entry
    assert table.find("coop", "base2novel", AVERAGE).checked
    assert table.find("coop", "domain-generalization", "imagenetv2", train_dataset="imagenet").checked
    assert table.find("plotpp", "fewshot", "dtd", shots=16).checked
    assert not table.find("maple", "base2novel", "eurosat").checked
    assert not table.find("cocoop", "cross-dataset", "dtd", train_dataset="imagenet").checked
    assert not table.find("promptsrc", "fewshot", AVERAGE, shots=4).checked


def test_published_averages_match_datasets(table):
    groups = defaultdict(list)
    for entry in table.entries:
        groups[(entry.method, entry.protocol, entry.shots, entry.train_dataset)].append(entry)

    verified = set()
    for (method, protocol, shots, train), entries in groups.items():
        average = next((e for e in entries if e.dataset == AVERAGE), None)
        per_dataset = {e.dataset: e for e in entries if e.dataset != AVERAGE}
        if average is None or set(table.average_over[protocol]) - set(per_dataset):
            continue
        members = [per_dataset[name] for name in table.average_over[protocol]]
        tolerance = max(_bound(e) for e in members) + _bound(average) + 1e-9
        for metric in ("base_accuracy", "novel_accuracy", "accuracy"):
            if metric not in average.metrics or any(metric not in e.metrics for e in members):
                continue
            mean = statistics.fmean(e.metrics[metric] for e in members)
            assert abs(mean - average.metrics[metric]) <= tolerance, (method, protocol, metric, mean)
            verified.add((method, protocol))

    # Where the reference notes list every per-dataset value, the check above must have run.
    assert verified >= {
        ("kgcoop", "base2novel"), ("maple", "base2novel"), ("promptsrc", "base2novel"),
        ("coprompt", "base2novel"), ("tcp", "base2novel"), ("plotpp", "fewshot"),
        ("cocoop", "cross-dataset"), ("maple", "cross-dataset"),
        ("coop", "domain-generalization"), ("cocoop", "domain-generalization"),
        ("kgcoop", "domain-generalization"), ("maple", "domain-generalization"),
        ("promptsrc", "domain-generalization"), ("coprompt", "domain-generalization"),
        ("tcp", "domain-generalization"),
    }


def test_published_hm_matches_base_novel(table):
    # The HM of a row is the HM of its base and novel values, and the average HM is the HM of
    # the averaged base and novel, as the papers compute it.
    checked = 0
    for entry in table.entries:
        metrics = entry.metrics
        if entry.protocol != "base2novel" or "base_accuracy" not in metrics:
            continue
        # HM has partial derivatives summing to at most 2, so rounded inputs move it by at most
        # twice their rounding bound.
        tolerance = 3 * _bound(entry) + 1e-9
        expected = harmonic_mean(metrics["base_accuracy"], metrics["novel_accuracy"])
        assert abs(expected - metrics["harmonic_mean"]) <= tolerance, entry
        checked += 1
    assert checked >= 60


def test_find_keys(table):
    assert table.find("coop", "fewshot", AVERAGE, shots=16).metrics["accuracy"] == 79.89
    assert table.find("coop", "fewshot", AVERAGE, shots=3) is None
    assert table.find("maple", "cross-dataset", "dtd", train_dataset="imagenet").metrics["accuracy"] == 46.49
    assert table.find("maple", "cross-dataset", "dtd", train_dataset="caltech101") is None
    assert table.find("nomethod", "base2novel", AVERAGE) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metrics": {"accuracy": 120.0}}, "0..100"),
        ({"metrics": {"harmonic_mean": 50.0}}, "not one of"),
        ({"source": "blog"}, "source"),
        ({"checked": "yes"}, "checked"),
        ({"train_dataset": None}, "train_dataset"),
    ],
)
def test_malformed_entry_rejected(tmp_path, change, message):
    entry = {"method": "coop", "protocol": "cross-dataset", "dataset": "dtd", "shots": 16, "train_dataset": "imagenet",
             "metrics": {"accuracy": 40.0}, "decimals": 2, "source": "paper", "citation": "test", "checked": False}
    entry.update(change)
    shipped = json.loads(default_published_path().read_text())
    shipped["entries"] = [entry]
    path = tmp_path / "published.json"
    path.write_text(json.dumps(shipped))
    with pytest.raises(ValueError, match=message):
        load_published(path)

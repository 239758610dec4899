"""Frozen image feature cache: hits, misses, invalidation, equality with pixels, training views."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from PIL import Image

from benchmarks import ImageListDataset, build_digits, build_transform, read_dataset
from benchmarks.streams import make_experience
from learners import ClassSet, TrainConfig, get_method, load_backbone
from strategies.feature_cache import (
    EpochViewPlugin,
    FeatureCache,
    SeededViews,
    backbone_fingerprint,
    eval_experience,
    train_experience,
)
from strategies.prompt_strategy import PromptStrategy

FEATURE_METHODS = ("zeroshot", "coop", "kgcoop", "tcp", "cocoop", "plot")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_data")
    build_digits(root)
    return read_dataset("digits", root)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("toy-clip", "none")


@pytest.fixture(scope="module")
def classes(digits):
    return ClassSet(digits.classnames, digits.template, "digits")


def copy_images(digits, folder, count, split="test", train=False, on_error="raise"):
    """An ImageListDataset over copies of the first ``count`` images of a split, under ``folder``."""
    items = list(getattr(digits, split)[:count])
    for item in items:
        target = folder / item.impath
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(digits.image_root / item.impath, target)
    return ImageListDataset(items, folder, build_transform(32, train=train), on_error=on_error)


def build_learner(method, backbone, classes, **config):
    spec = get_method(method)
    torch.manual_seed(1)
    learner = spec.learner_class(backbone, spec.config_class(**config))
    learner.set_classnames(classes)
    return learner


def stacked_images(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, H, W)


def test_second_call_is_a_hit(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 7)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone, batch_size=3)

    first, labels = cache.features(learner, dataset)
    assert cache.encoded_images == 7
    assert first.shape == (7, backbone.embed_dim)
    assert labels.tolist() == dataset.targets
    assert cache.path(learner, dataset).is_file()

    second, _ = FeatureCache(tmp_path / "features", backbone).features(learner, dataset)
    again = FeatureCache(tmp_path / "features", backbone)
    again.features(learner, dataset)
    assert again.encoded_images == 0
    assert torch.equal(first, second)


def test_changed_image_reencodes_only_it(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 6)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone)
    before, _ = cache.features(learner, dataset)

    changed = tmp_path / "images" / dataset.items[2].impath
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after, _ = cache.features(learner, dataset)

    assert cache.encoded_images == 6 + 1
    unchanged = [0, 1, 3, 4, 5]
    assert torch.equal(after[unchanged], before[unchanged])
    expected = learner.frozen_image_features(dataset[2][0].unsqueeze(0))[0]
    assert torch.allclose(after[2], expected, atol=1e-5)
    assert not torch.allclose(after[2], before[2], atol=1e-3)


def test_touched_mtime_invalidates_row(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 4)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone)
    cache.features(learner, dataset)
    touched = tmp_path / "images" / dataset.items[0].impath
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    cache.features(learner, dataset)
    assert cache.encoded_images == 4 + 1


def test_other_backbone_misses(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 3)
    learner = build_learner("coop", backbone, classes)
    FeatureCache(tmp_path / "features", backbone).features(learner, dataset)

    torch.manual_seed(0)
    same_weights = load_backbone("toy-clip", "none")
    assert backbone_fingerprint(same_weights) == backbone_fingerprint(backbone)
    hit = FeatureCache(tmp_path / "features", same_weights)
    hit.features(build_learner("coop", same_weights, classes), dataset)
    assert hit.encoded_images == 0

    torch.manual_seed(123)
    other = load_backbone("toy-clip", "none")
    assert backbone_fingerprint(other) != backbone_fingerprint(backbone)
    miss = FeatureCache(tmp_path / "features", other)
    miss.features(build_learner("coop", other, classes), dataset)
    assert miss.encoded_images == 3


def test_other_transform_misses(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 3)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone)
    cache.features(learner, dataset)
    other = ImageListDataset(dataset.items, dataset.image_root, build_transform(32, train=False, mean=(0.5, 0.5, 0.5)))
    assert cache.path(learner, other) != cache.path(learner, dataset)
    cache.features(learner, other)
    assert cache.encoded_images == 6


def test_feature_kind_keys_the_file(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 3)
    cache = FeatureCache(tmp_path / "features", backbone)
    coop = build_learner("coop", backbone, classes)
    plot = build_learner("plot", backbone, classes)
    assert cache.path(coop, dataset) != cache.path(plot, dataset)
    features, _ = cache.features(plot, dataset)
    assert features.shape == (3, 1 + (32 // 8) ** 2, backbone.embed_dim)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_cached_logits_equal_pixel_logits(tmp_path, digits, backbone, classes, method):
    dataset = copy_images(digits, tmp_path / "images", 5)
    learner = build_learner(method, backbone, classes)
    learner.eval()
    features, labels = FeatureCache(tmp_path / "features", backbone).features(learner, dataset)
    images = stacked_images(dataset)
    with torch.no_grad():
        from_pixels = learner(images)
        from_cache = learner.forward_features(features)
    assert (from_pixels - from_cache).abs().max() < 1e-5
    if method != "zeroshot":
        pixel_logits, pixel_terms = learner.loss_terms(images, labels)
        cache_logits, cache_terms = learner.loss_terms_features(features, labels)
        assert (pixel_logits - cache_logits).abs().max() < 1e-5
        assert pixel_terms.keys() == cache_terms.keys()
        for name in pixel_terms:
            assert abs(float(pixel_terms[name]) - float(cache_terms[name])) < 1e-5


def test_prompted_image_towers_are_not_cached(backbone, classes):
    for method in ("bip", "plotpp", "ivlp", "maple", "promptsrc", "coprompt"):
        learner = build_learner(method, backbone, classes)
        assert not FeatureCache.applies_to(learner)
        with pytest.raises(NotImplementedError, match="prompts"):
            learner.forward_features(torch.zeros(2, backbone.embed_dim))


def test_config_switches_cache_off(tmp_path, backbone):
    assert FeatureCache.from_config(tmp_path, backbone, TrainConfig(feature_cache=False), "cpu") is None
    cache = FeatureCache.from_config(tmp_path, backbone, TrainConfig(train_feature_views=3, eval_batch_size=7), "cpu")
    assert cache.train_views == 3
    assert cache.batch_size == 7
    with pytest.raises(ValueError, match="train_feature_views"):
        TrainConfig(train_feature_views=-1)


def make_strategy(learner, cache=None, epochs=1, batch_size=4, plugins=()):
    strategy = PromptStrategy(
        learner=learner,
        train_config=TrainConfig(epochs=epochs, batch_size=batch_size, eval_batch_size=4, lr=0.01, warmup_epochs=0),
        progress=False,
        plugins=list(plugins),
    )
    strategy.feature_cache = cache
    return strategy


def test_eval_from_cache_matches_pixels(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 10)
    learner = build_learner("coop", backbone, classes)
    plain = make_strategy(learner)
    eval_experience(plain, dataset)
    expected = (plain.accuracy.correct, plain.accuracy.total)

    cache = FeatureCache(tmp_path / "features", backbone)
    cached = make_strategy(learner, cache)
    eval_experience(cached, dataset)
    eval_experience(cached, dataset)
    assert cache.encoded_images == 10
    assert (cached.accuracy.correct, cached.accuracy.total) == expected
    assert not cached.inputs_are_features

    off = make_strategy(learner, None)
    eval_experience(off, dataset)
    assert not (tmp_path / "features").exists() or cache.encoded_images == 10


def test_size_limit_falls_back_to_pixels(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 4)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone, max_bytes=100)
    assert not cache.fits(learner, dataset)
    assert cache.training_views(learner, dataset, epochs=3) == 0
    eval_experience(make_strategy(learner, cache), dataset)
    assert cache.encoded_images == 0
    assert not list((tmp_path / "features").rglob("*.pt"))


def test_unreadable_cache_file_is_reencoded(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 3)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone)
    good, _ = cache.features(learner, dataset)
    cache.path(learner, dataset).write_bytes(b"not a torch file")
    again, _ = cache.features(learner, dataset)
    assert cache.encoded_images == 6
    assert torch.allclose(good, again)


def test_skipped_images_reported_on_hit(tmp_path, digits, backbone, classes):
    dataset = copy_images(digits, tmp_path / "images", 4, on_error="skip")
    broken = tmp_path / "images" / dataset.items[1].impath
    broken.write_bytes(b"not an image")
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone)
    cache.features(learner, dataset)
    assert dataset.skipped == {str(broken)}

    fresh = ImageListDataset(dataset.items, dataset.image_root, dataset.transform, on_error="skip")
    cache.features(learner, fresh)
    assert cache.encoded_images == 4
    assert fresh.skipped == {str(broken)}


def train_context(learner, strategy, run):
    torch.manual_seed(7)
    run(strategy)
    return learner.ctx.detach().clone()


def test_views_reproduce_seeded_training(tmp_path, digits, backbone, classes):
    """With K >= epochs, cached training equals pixel training on the same seeded views."""
    train_set = copy_images(digits, tmp_path / "images", 8, split="train", train=True)
    epochs = 3

    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone, batch_size=5)
    cached = make_strategy(learner, cache, epochs=epochs)
    cached_ctx = train_context(learner, cached, lambda s: train_experience(s, train_set, seed=5))
    assert cache.encoded_images == 8 * epochs
    assert len(list((tmp_path / "features").rglob("train-view*.pt"))) == epochs
    assert not cached.inputs_are_features

    learner = build_learner("coop", backbone, classes)
    views = SeededViews(train_set, seed=5)
    pixels = make_strategy(learner, epochs=epochs, plugins=[EpochViewPlugin(views)])
    pixel_ctx = train_context(learner, pixels, lambda s: s.train(make_experience(views), num_workers=0))

    assert torch.allclose(cached_ctx, pixel_ctx, atol=1e-5)
    assert [round(r["ce"], 4) for r in cached.history] == [round(r["ce"], 4) for r in pixels.history]


def test_warm_cache_trains_like_cold(tmp_path, digits, backbone, classes):
    train_set = copy_images(digits, tmp_path / "images", 6, split="train", train=True)
    cache = FeatureCache(tmp_path / "features", backbone)
    contexts = []
    for _ in range(2):
        learner = build_learner("coop", backbone, classes)
        strategy = make_strategy(learner, cache, epochs=2, batch_size=4)
        contexts.append(train_context(learner, strategy, lambda s: train_experience(s, train_set, seed=3)))
    assert cache.encoded_images == 6 * 2  # the second run reads both views from disk
    assert torch.equal(contexts[0], contexts[1])


def test_fewer_views_than_epochs_repeat(tmp_path, digits, backbone, classes):
    train_set = copy_images(digits, tmp_path / "images", 6, split="train", train=True)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone, train_views=2)
    assert cache.training_views(learner, train_set, epochs=5) == 2

    view0, _ = cache.features(learner, train_set, view=0, seed=1)
    view1, _ = cache.features(learner, train_set, view=1, seed=1)
    again0, _ = cache.features(learner, train_set, view=0, seed=1)
    other_seed, _ = cache.features(learner, train_set, view=0, seed=2)
    assert torch.equal(view0, again0)
    assert not torch.allclose(view0, view1)
    assert not torch.allclose(view0, other_seed)

    strategy = make_strategy(learner, cache, epochs=5, batch_size=3)
    train_experience(strategy, train_set, seed=1)
    assert cache.encoded_images == 6 * 3  # views 0 and 1 of seed 1, view 0 of seed 2
    assert len(strategy.history) == 5


def test_train_views_zero_reads_pixels(tmp_path, digits, backbone, classes):
    train_set = copy_images(digits, tmp_path / "images", 4, split="train", train=True)
    learner = build_learner("coop", backbone, classes)
    cache = FeatureCache(tmp_path / "features", backbone, train_views=0)
    train_experience(make_strategy(learner, cache, epochs=1), train_set, seed=1)
    assert cache.encoded_images == 0


@pytest.mark.slow
def test_cli_feature_cache_switch(tmp_path, digits):
    import json

    import run_benchmark

    data_root = tmp_path / "data"
    build_digits(data_root)
    common = [
        "base2novel", "--method", "coop", "--dataset", "digits", "--model", "toy-clip", "--pretrained", "none",
        "--shots", "1", "--data-root", str(data_root), "--no-progress", "--log-level", "WARNING",
    ]

    def run(name, *extra):
        cache_dir, output = tmp_path / f"cache-{name}", tmp_path / f"runs-{name}"
        status = run_benchmark.main([*common, "--cache-dir", str(cache_dir), "--output-dir", str(output), *extra])
        assert status == 0
        results = json.loads(next(output.rglob("results.json")).read_text())
        return cache_dir / "features", results

    off_dir, off = run("off", "--epochs", "0", "--feature-cache", "off")
    on_dir, on = run("on", "--epochs", "0")
    assert not off_dir.exists()
    assert len(list(on_dir.rglob("eval-*.pt"))) == 2  # base and novel test sets
    assert off["config"]["train"]["feature_cache"] is False
    assert on["config"]["train"]["feature_cache"] is True
    assert (on["base_accuracy"], on["novel_accuracy"]) == (off["base_accuracy"], off["novel_accuracy"])

    trained_dir, trained = run("train", "--epochs", "2", "--set", "train_feature_views=1")
    assert len(list(trained_dir.rglob("train-view*.pt"))) == 1
    assert trained["config"]["train"]["train_feature_views"] == 1
    assert len(trained["epochs"]) == 2

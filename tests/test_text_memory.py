"""Text tower: chunked and checkpointed encoding, truncation on every method, prompts per step."""

from __future__ import annotations

import pytest
import torch

from learners import ClassSet, TrainConfig, get_method, list_methods, load_backbone
from learners.backbone import TokenReplacement
from strategies.prompt_strategy import PromptStrategy

NAMES = ("cat", "golden retriever", "sea anemone", "ox", "great white shark", "tabby cat", "ice cream")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("toy-clip", "none")


@pytest.fixture(scope="module")
def classes():
    return ClassSet(NAMES, "a photo of a {}.", "toy")


def prompt_inputs(backbone):
    ids = backbone.tokenize([f"a photo of a {name}." for name in NAMES])
    embeddings = backbone.token_embedding(ids).detach().clone().requires_grad_(True)  # (K, L, D)
    torch.manual_seed(3)
    tokens = (0.02 * torch.randn(len(NAMES), 2, backbone.text_width)).requires_grad_(True)  # (K, M, D)
    return embeddings, backbone.eot_index(ids), tokens


def assert_same(actual, expected):
    """Equal up to float32 rounding: the largest difference is below 1e-5 of the largest value."""
    difference = float((actual - expected).abs().max())
    assert difference <= 1e-5 * float(expected.abs().max()), difference


def features_and_grads(backbone, **options):
    embeddings, eot, tokens = prompt_inputs(backbone)
    deep = {4: TokenReplacement(tokens, start=1, weight=0.5)}
    features = backbone.encode_text_tokens(embeddings, eot, deep=deep, **options)
    weights = torch.linspace(-1.0, 1.0, features.numel()).view_as(features)
    (features * weights).sum().backward()
    return features.detach(), embeddings.grad, tokens.grad


def test_chunked_checkpointed_match_plain(backbone):
    plain = features_and_grads(backbone)
    for options in ({"chunk_size": 3}, {"checkpoint": True}, {"chunk_size": 2, "checkpoint": True}):
        other = features_and_grads(backbone, **options)
        for expected, actual in zip(plain, other):
            assert_same(actual, expected)


def test_truncation_matches_full_length(backbone):
    truncated = features_and_grads(backbone)
    full = features_and_grads(backbone, truncate=False)
    for expected, actual in zip(full, truncated):
        assert_same(actual, expected)


def test_text_memory_sets_defaults(backbone):
    plain = features_and_grads(backbone)
    with backbone.text_memory(chunk_size=2, checkpoint=True) as options:
        assert backbone.text_memory_options is options
        bounded = features_and_grads(backbone)
    assert backbone.text_memory_options.chunk_size is None
    assert not backbone.text_memory_options.checkpoint
    for expected, actual in zip(plain, bounded):
        assert_same(actual, expected)


def count_text_passes(backbone):
    """Record the sequence count and length of every pass through the first text block."""
    passes = []
    block = backbone._text.transformer.resblocks[0]
    handle = block.register_forward_pre_hook(lambda module, args: passes.append(tuple(args[0].shape[:2])))
    return passes, handle


def count_text_encodings(backbone, monkeypatch):
    """Record the sequence count of every encode_text_tokens call (one per encoded prompt set)."""
    calls = []
    encode = backbone.encode_text_tokens

    def counted(embeddings, *args, **kwargs):
        calls.append(embeddings.shape[0])
        return encode(embeddings, *args, **kwargs)

    monkeypatch.setattr(backbone, "encode_text_tokens", counted)
    return calls


def test_length_buckets_split_large_sets(backbone):
    ids = backbone.tokenize([f"a photo of a {'big ' * (i % 9)}dog." for i in range(80)])
    embeddings, eot = backbone.token_embedding(ids), backbone.eot_index(ids)
    passes, handle = count_text_passes(backbone)
    try:
        with torch.no_grad():
            bucketed = backbone.encode_text_tokens(embeddings, eot)
    finally:
        handle.remove()
    assert [k for k, _ in passes] == [16] * 5
    assert sum(k * length for k, length in passes) < 80 * (int(eot.max()) + 1)
    with torch.no_grad(), backbone.text_memory(chunk_size=80):
        one_pass = backbone._encode_text_chunk(embeddings, eot, None, True, False, False)
    assert_same(bucketed, one_pass)


def test_chunks_respect_global_limit(backbone):
    embeddings, eot, _ = prompt_inputs(backbone)
    passes, handle = count_text_passes(backbone)
    try:
        with torch.no_grad(), backbone.text_memory(chunk_size=3):
            backbone.encode_text_tokens(embeddings, eot, chunk_size=5)
    finally:
        handle.remove()
    assert [k for k, _ in passes] == [3, 3, 1]
    # Chunks hold prompts of similar length, so the short ones stop early.
    assert passes[0][1] < passes[-1][1] == int(eot.max()) + 1


def test_checkpoint_stores_less(backbone):
    embeddings, eot, _ = prompt_inputs(backbone)

    def saved_bytes(checkpoint):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            backbone.encode_text_tokens(embeddings, eot, checkpoint=checkpoint)
        return total

    assert saved_bytes(True) < saved_bytes(False) / 3


@pytest.mark.parametrize("method", [m for m in list_methods()])
def test_every_method_truncates_its_prompts(backbone, classes, method):
    spec = get_method(method)
    torch.manual_seed(1)
    learner = spec.learner_class(backbone, spec.config_class())
    passes, handle = count_text_passes(backbone)
    try:
        learner.set_classnames(classes)
        images = torch.randn(2, 3, 32, 32)
        labels = torch.tensor([0, 3])
        learner.loss_terms(images, labels)
        with torch.no_grad():
            learner.eval()
            learner(images)
    finally:
        handle.remove()
    assert passes, f"{method} never ran the text tower"
    longest = max(length for _, length in passes)
    assert longest < backbone.context_length, f"{method} ran a {longest}-token text pass"


@pytest.mark.parametrize("method", ["coop", "kgcoop", "tcp", "plot", "ivlp"])
def test_prompts_encoded_once_per_step(backbone, classes, method, monkeypatch):
    spec = get_method(method)
    torch.manual_seed(1)
    learner = spec.learner_class(backbone, spec.config_class())
    learner.set_classnames(classes)
    calls = count_text_encodings(backbone, monkeypatch)
    learner.loss_terms(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert len(calls) == 1


# CoCoOp's prompts depend on each image, and zero-shot encodes its prompts when the classes are set.
@pytest.mark.parametrize("method", [m for m in list_methods() if m not in ("cocoop", "zeroshot")])
def test_evaluation_pass_encodes_prompts_once(backbone, classes, monkeypatch, method):
    from benchmarks.streams import make_experience
    from torch.utils.data import TensorDataset

    spec = get_method(method)
    torch.manual_seed(0)
    learner = spec.learner_class(backbone, spec.config_class())
    learner.set_classnames(classes)
    strategy = PromptStrategy(
        learner=learner, train_config=TrainConfig(epochs=1, eval_batch_size=4), progress=False
    )
    data = TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % len(NAMES))
    data.targets = (torch.arange(10) % len(NAMES)).tolist()
    calls = count_text_encodings(backbone, monkeypatch)
    strategy.eval([make_experience(data)])
    assert len(calls) == 1  # three batches of images, one encoding of the class prompts
    assert calls[0] % len(NAMES) == 0
    assert strategy.accuracy.total == 10


def test_text_memo_off_with_gradients(backbone, classes):
    spec = get_method("coop")
    learner = spec.learner_class(backbone, spec.config_class())
    learner.set_classnames(classes)

    # With gradients enabled the memo is off, so every training step uses the current parameters.
    with learner.reuse_text_features():
        first = learner.text_features()
        with torch.no_grad():
            learner.ctx.add_(1.0)
        assert not torch.equal(first, learner.text_features())


def test_strategy_applies_train_config_bounds(backbone, classes):
    spec = get_method("coop")
    learner = spec.learner_class(backbone, spec.config_class())
    learner.set_classnames(classes)
    config = TrainConfig(epochs=1, max_text_chunk=3, text_checkpoint=True)
    strategy = PromptStrategy(learner=learner, train_config=config, progress=False)
    with strategy.text_memory():
        assert backbone.text_memory_options.chunk_size == 3
        assert backbone.text_memory_options.checkpoint
    with pytest.raises(ValueError, match="max_text_chunk"):
        TrainConfig(max_text_chunk=0)


def test_cocoop_bounded_matches_plain(backbone, classes):
    spec = get_method("cocoop")
    torch.manual_seed(1)
    learner = spec.learner_class(backbone, spec.config_class(text_chunk_size=8))
    learner.set_classnames(classes)
    features = torch.randn(3, backbone.embed_dim)  # (B, E)
    labels = torch.tensor([0, 2, 5])

    def logits_and_grads():
        learner.zero_grad(set_to_none=True)
        logits, terms = learner.loss_terms_features(features, labels)
        sum(terms.values()).backward()
        return logits.detach(), learner.ctx.grad.clone(), learner.meta_net.linear1.weight.grad.clone()

    plain = logits_and_grads()
    with backbone.text_memory(chunk_size=4, checkpoint=True):
        bounded = logits_and_grads()
    for expected, actual in zip(plain, bounded):
        assert_same(actual, expected)

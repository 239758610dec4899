"""Backbone adapter: loading, QuickGELU, frozen towers, exact truncation, prompt insertion."""

from __future__ import annotations

import open_clip
import pytest
import torch

from learners import PretrainedWeightsError, TokenReplacement, load_backbone, register_model_configs
from learners.backbone import replace_tokens


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("toy-clip", "none")


def test_towers_frozen_and_in_eval_mode(backbone):
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    assert all(not m.training for m in backbone.model.modules())


def test_toy_clip_uses_quickgelu(backbone):
    block = backbone.model.visual.transformer.resblocks[0]
    assert isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU)


def test_text_truncation_matches_full_77_token_run(backbone):
    prompts = ["a photo of a cat.", "x", "a very long prompt with many many words in it to check truncation."]
    ids = backbone.tokenize(prompts)
    embeddings = backbone.token_embedding(ids)
    eot = backbone.eot_index(ids)
    with torch.no_grad():
        reference = backbone.model.encode_text(ids)
        truncated = backbone.encode_text_tokens(embeddings, eot, truncate=True)
        full = backbone.encode_text_tokens(embeddings, eot, truncate=False)
    assert ids.shape[1] == 77
    assert int(eot.max()) + 1 < 77
    torch.testing.assert_close(full, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(truncated, reference, rtol=0, atol=1e-5)


def test_text_chunks_match_one_pass(backbone):
    ids = backbone.tokenize([f"a photo of a {i}." for i in range(7)])
    embeddings, eot = backbone.token_embedding(ids), backbone.eot_index(ids)
    replacement = {3: TokenReplacement(torch.randn(7, 2, backbone.text_width), start=1)}
    with torch.no_grad():
        whole = backbone.encode_text_tokens(embeddings, eot, deep=replacement)
        chunked = backbone.encode_text_tokens(embeddings, eot, deep=replacement, chunk_size=3)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_text_slots_from_the_end_disable_truncation(backbone):
    ids = backbone.tokenize(["a photo of a cat.", "x"])
    embeddings, eot = backbone.token_embedding(ids), backbone.eot_index(ids)
    replacement = {2: TokenReplacement(torch.randn(2, backbone.text_width), start=-2)}
    with torch.no_grad():
        truncated = backbone.encode_text_tokens(embeddings, eot, deep=replacement, truncate=True)
        full = backbone.encode_text_tokens(embeddings, eot, deep=replacement, truncate=False)
    torch.testing.assert_close(truncated, full, rtol=0, atol=0)


def test_image_encoder_matches_open_clip(backbone):
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = backbone.model.encode_image(images)
        ours, tokens = backbone.encode_image(images, return_tokens=True)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    grid = (32 // 8) ** 2
    assert tokens.shape == (3, grid, backbone.embed_dim)


def test_vision_prompts_change_output_and_are_dropped_before_pooling(backbone):
    images = torch.randn(2, 3, 32, 32)
    prompts = torch.randn(3, backbone.vision_width)
    with torch.no_grad():
        plain = backbone.encode_image(images)
        prompted, tokens = backbone.encode_image(images, prompts=prompts, return_tokens=True)
    assert not torch.allclose(plain, prompted)
    assert tokens.shape[1] == (32 // 8) ** 2


def test_deep_replacement_hits_exactly_the_configured_block(backbone):
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda module, args, i=i: seen.__setitem__(i, args[0].clone()))
        for i, block in enumerate(backbone.model.visual.transformer.resblocks)
    ]
    marker = torch.full((2, backbone.vision_width), 7.0)
    try:
        with torch.no_grad():
            backbone.encode_image(
                torch.randn(1, 3, 32, 32),
                prompts=torch.zeros(2, backbone.vision_width),
                deep={4: TokenReplacement(marker, start=-2)},
            )
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(seen[4][0, -2:], marker)
    assert not torch.equal(seen[3][0, -2:], marker)
    assert not torch.equal(seen[5][0, -2:], marker)


def test_replace_tokens_blends_with_weight():
    x = torch.zeros(2, 5, 4)
    out = replace_tokens(x, TokenReplacement(torch.ones(2, 4), start=1, weight=0.25))
    assert torch.equal(out[:, 1:3], torch.full((2, 2, 4), 0.25))
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(out[:, 3:], x[:, 3:])
    with pytest.raises(ValueError, match="do not fit"):
        replace_tokens(x, TokenReplacement(torch.ones(2, 4), start=4))


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-61'.*ViT-B-16"):
        load_backbone("ViT-B-61", "none")


def test_missing_weight_file_names_the_fix(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found.*'none'"):
        load_backbone("toy-clip", str(tmp_path / "ViT-B-16.pt"))


def test_corrupt_weight_file_names_the_fix(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="corrupt or not a torch checkpoint"):
        load_backbone("toy-clip", str(bad))


def test_unreachable_hub_names_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights: network is unreachable")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(PretrainedWeightsError, match=r"--pretrained .*\.cache/clip/ViT-B-16\.pt"):
        load_backbone("ViT-B-16", "openai")


def test_local_state_dict_round_trip(tmp_path, backbone):
    path = tmp_path / "toy.pt"
    torch.save(backbone.model.state_dict(), path)
    loaded = load_backbone("toy-clip", str(path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), backbone.encode_image(images))


def test_openai_torchscript_archive_loads_with_quickgelu(tmp_path):
    """A TorchScript archive with OpenAI's key layout (what ~/.cache/clip/*.pt files are) loads."""
    register_model_configs()
    model = open_clip.create_model("toy-clip", pretrained=None).eval()
    path = tmp_path / "ViT-toy.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_backbone("toy-clip", str(path))
    assert isinstance(loaded.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    torch.testing.assert_close(loaded.model.token_embedding.weight, model.token_embedding.weight)

"""Helpers shared by the CoCoOp, KgCoOp, TCP and BIP tests: toy backbone, digit images, CLI runs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from learners import ClassSet, ClipBackbone, load_backbone

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BASE = ClassSet(DIGIT_NAMES[:5], "a photo of the digit {}.", "digits")
NOVEL = ClassSet(DIGIT_NAMES[5:], "a photo of the digit {}.", "digits")
# Another size than BASE, so class-dependent shapes change on the switch.
NOVEL_3 = ClassSet(DIGIT_NAMES[5:8], "a photo of the digit {}.", "digits")

_digits_root: Path | None = None


@functools.lru_cache(maxsize=1)
def toy_backbone() -> ClipBackbone:
    """The randomly initialized ``toy-clip`` backbone, built once per test session."""
    torch.manual_seed(0)
    return load_backbone("toy-clip", "none")


def digit_images(count: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real 8x8 scikit-learn digits as normalized ``(count, 3, 32, 32)`` images and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images[first : first + count], dtype=torch.float32) / 16.0
    images = F.interpolate(pixels.unsqueeze(1), size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target[first : first + count], dtype=torch.long)
    return (images - CLIP_MEAN) / CLIP_STD, labels


def base_batch(count: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit images whose labels are all in the base classes 0..4."""
    images, labels = digit_images(60)
    keep = torch.nonzero(labels < 5).squeeze(1)[:count]
    return images[keep], labels[keep]


def shared_digits_root(tmp_path_factory) -> Path:
    """A data root holding the built-in digits dataset, written once per test session."""
    global _digits_root
    if _digits_root is None:
        from benchmarks import build_digits

        root = tmp_path_factory.mktemp("tcp-family-data")
        build_digits(root)
        _digits_root = root
    return _digits_root


def run_base2novel_cli(method: str, data_root: Path, work: Path, *extra: str) -> dict:
    """Run ``run_benchmark.py base2novel`` in-process on digits with toy-clip; return results.json."""
    import run_benchmark

    status = run_benchmark.main(
        [
            "base2novel",
            "--method", method,
            "--dataset", "digits",
            "--model", "toy-clip",
            "--pretrained", "none",
            "--epochs", "1",
            "--shots", "2",
            "--data-root", str(data_root),
            "--cache-dir", str(work / "cache"),
            "--output-dir", str(work / "runs"),
            "--no-progress",
            *extra,
        ]
    )
    assert status == 0
    path = work / "runs" / "base2novel" / "digits" / method / "seed1" / "results.json"
    return json.loads(path.read_text())


def trainable_names(learner) -> set[str]:
    return {name for name, p in learner.named_parameters() if p.requires_grad}


def backbone_snapshot(backbone: ClipBackbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


def assert_backbone_unchanged(backbone: ClipBackbone, snapshot: dict[str, torch.Tensor]) -> None:
    assert not any(p.requires_grad for p in backbone.model.parameters())
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, snapshot[key]), f"backbone tensor {key} changed"


def train_steps(learner, images: torch.Tensor, labels: torch.Tensor, steps: int = 2, lr: float = 0.05) -> dict[str, float]:
    """A few Adam steps on the learner's trainable parameters; returns the last loss terms."""
    optimizer = torch.optim.Adam(learner.trainable_parameters(), lr=lr)
    terms: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        _, terms = learner.loss_terms(images, labels)
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def check_round_trip_and_novel_switch(learner, tmp_path: Path):
    """Train, save, and check that strict loads restore identical logits on BASE and NOVEL_3.

    The learner must be set to BASE. Returns the fresh learner that loaded the checkpoint after
    ``set_classnames(NOVEL_3)``; ``learner`` is left on NOVEL_3.
    """
    from learners import build_learner, load_checkpoint, save_checkpoint

    images, labels = base_batch(4)
    train_steps(learner, images, labels)
    path = save_checkpoint(tmp_path / f"{learner.method_name}.pt", learner)
    assert set(torch.load(path)["state_dict"]) == {name for name, _ in learner.named_parameters()}

    restored = build_learner(learner.method_name, learner.backbone)
    restored.set_classnames(BASE)
    load_checkpoint(path, restored)
    with torch.no_grad():
        assert torch.equal(restored(images), learner(images))

    learner.set_classnames(NOVEL_3)
    fresh = build_learner(learner.method_name, learner.backbone)
    fresh.set_classnames(NOVEL_3)
    load_checkpoint(path, fresh)
    with torch.no_grad():
        novel_logits = learner(images)
        assert novel_logits.shape == (4, 3)
        assert torch.equal(fresh(images), novel_logits)
    return fresh

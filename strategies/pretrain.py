"""``--pretrained digits``: offline weights for ``toy-clip`` from a short contrastive pre-training.

The weights are learned on the training split of the built-in ``digits`` dataset only (never its
validation or test split), with captions made from the digit names, so that zero-shot CLIP on
``digits`` is far above chance and every protocol runs offline end to end. The result is an
ordinary open_clip state dict, cached and loaded like any local checkpoint file.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import ImageListDataset, build_digits, build_transform, read_dataset
from learners import load_backbone
from learners.io import save_torch

logger = logging.getLogger(__name__)

DIGITS_TAG = "digits"
DIGITS_MODEL = "toy-clip"
WEIGHTS_VERSION = 1
CAPTION_TEMPLATES = (
    "a photo of the digit {}.",
    "a photo of the number {}.",
    "the handwritten digit {}.",
    "a picture of a {}.",
    "{}",
    "a blurry photo of the digit {}.",
    "an image of the number {}.",
    "a drawing of a {}.",
)


def default_cache_dir() -> Path:
    """``$VLPROMPT_CACHE`` or ``~/.cache/vlprompt``."""
    return Path(os.environ.get("VLPROMPT_CACHE", Path("~/.cache/vlprompt").expanduser()))


def digits_weights_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "weights" / f"{DIGITS_MODEL}-{DIGITS_TAG}-v{WEIGHTS_VERSION}.pt"


def ensure_digits_weights(
    data_root: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    epochs: int = 20,
    seed: int = 0,
) -> Path:
    """Return the cached ``toy-clip`` digits weights, pre-training them first if missing."""
    path = digits_weights_path(cache_dir)
    if path.is_file():
        return path
    logger.info("pre-training toy-clip on the digits training split (first run only, a few minutes on CPU) -> %s", path)
    state = pretrain_on_digits(data_root, epochs=epochs, seed=seed)
    save_torch(path, state)
    return path


def pretrain_on_digits(
    data_root: str | os.PathLike, epochs: int = 20, seed: int = 0, lr: float = 1e-3, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Contrastive image-caption training of a random ``toy-clip`` on the digits train split.

    Each image is paired with a caption made from a template drawn from
    :data:`CAPTION_TEMPLATES` and its class name; all captions of the image's class are positives
    (multi-positive InfoNCE, in both directions, as CLIP's symmetric loss).
    """
    rng_state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        build_digits(data_root)
        splits = read_dataset("digits", data_root)
        backbone = load_backbone(DIGITS_MODEL, "none")
        model = backbone.model
        model.requires_grad_(True)
        model.train()
        size = backbone.image_size
        dataset = ImageListDataset(splits.train, splits.image_root, build_transform(size, train=False))
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, H, W)
        labels = torch.tensor(dataset.targets)
        names = splits.classnames
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        steps_per_epoch = max(len(images) // batch_size, 1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        for epoch in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            total = 0.0
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                batch = _augment(images[index], generator)
                batch_labels = labels[index]
                # One caption per image, from a random template: (B,) captions.
                captions = [
                    CAPTION_TEMPLATES[int(torch.randint(len(CAPTION_TEMPLATES), (1,), generator=generator))].format(names[y])
                    for y in batch_labels.tolist()
                ]
                ids = backbone.tokenize(captions)
                text = backbone.encode_text_tokens(backbone.token_embedding(ids), backbone.eot_index(ids), normalize=True)
                image = backbone.encode_image(batch, normalize=True)
                logits = model.logit_scale.exp() * image @ text.t()  # (B, B)
                # Every caption of the image's class is a positive, in both directions.
                positives = (batch_labels[:, None] == batch_labels[None, :]).float()
                targets = positives / positives.sum(dim=1, keepdim=True)
                loss = 0.5 * (
                    torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
                    + torch.sum(-targets * F.log_softmax(logits.t(), dim=1), dim=1).mean()
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, 4.6052)
                total += float(loss.detach())
            logger.info("digits pre-training epoch %d/%d loss %.4f", epoch + 1, epochs, total / steps_per_epoch)
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_rng_state(rng_state[0])
        random.setstate(rng_state[1])
        np.random.set_state(rng_state[2])


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 3 pixels and horizontal flips are not used (digits are not
    mirror-symmetric); small translations keep the pre-training from memorizing pixels."""
    shifted = torch.empty_like(images)
    for i in range(images.shape[0]):
        dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
        shifted[i] = torch.roll(images[i], shifts=(dy, dx), dims=(1, 2))
    return shifted

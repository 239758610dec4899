"""CoPrompt: MaPLe prompts plus output adapters, trained for consistency with the frozen model."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn
from torchvision.transforms import v2

from .backbone import ClipBackbone
from .base import ClassSet
from .config import TrainConfig
from .base import encode_texts, template_ensemble_features
from .losses import cosine_consistency
from .maple import MaPLe, MaPLeConfig
from .registry import register_method
from .templates import get_ensemble

logger = logging.getLogger(__name__)

# Per-dataset prompt depth, context length and consistency weight W of the reference
# (ShuvenduRoy/CoPrompt trainers/constants.py), merged after its yaml and command line there.
# Here they apply before the user's --set values, so --set overrides them.
COPROMPT_DATASET_OVERRIDES: dict[str, dict[str, float | int]] = {
    "imagenet": {"depth": 12, "n_ctx": 4, "consistency_weight": 8.0},
    "caltech101": {"depth": 12, "n_ctx": 4, "consistency_weight": 4.0},
    "oxford_pets": {"depth": 12, "n_ctx": 2, "consistency_weight": 0.1},
    "stanford_cars": {"depth": 12, "n_ctx": 4, "consistency_weight": 4.0},
    "oxford_flowers": {"depth": 9, "n_ctx": 4, "consistency_weight": 8.0},
    "food101": {"depth": 9, "n_ctx": 4, "consistency_weight": 0.5},
    "fgvc_aircraft": {"depth": 9, "n_ctx": 4, "consistency_weight": 2.0},
    "sun397": {"depth": 12, "n_ctx": 4, "consistency_weight": 8.0},
    "dtd": {"depth": 12, "n_ctx": 2, "consistency_weight": 8.0},
    "eurosat": {"depth": 12, "n_ctx": 2, "consistency_weight": 0.1},
    "ucf101": {"depth": 12, "n_ctx": 4, "consistency_weight": 2.0},
}


@dataclass(frozen=True)
class CoPromptConfig(MaPLeConfig):
    """CoPrompt: the MaPLe prompt design plus adapters and the consistency terms.

    Attributes:
        image_adapter_ratio: image feature = ratio * adapter(f) + (1 - ratio) * f.
        text_adapter_ratio: the same for the class text features.
        adapter_reduction: hidden width of each adapter is E / adapter_reduction.
        consistency_weight: the reference's W, the weight of both consistency terms (per-dataset
            values in ``COPROMPT_DATASET_OVERRIDES``; 1.0 elsewhere, as in its yaml).
        descriptions_file: JSON file mapping class name -> list of description sentences (the
            reference's LLM descriptions). ``{dataset}`` in the path is replaced by the dataset
            name. None falls back to ``fallback_templates``.
        fallback_templates: template ensemble of the text target when there are no descriptions.
        view_augment_ops: RandAugment operations per image of the frozen model's view.
        view_augment_magnitude: RandAugment magnitude (of 31 bins) of that view.
    """

    image_adapter_ratio: float = 0.1
    text_adapter_ratio: float = 0.2
    adapter_reduction: int = 4
    consistency_weight: float = 1.0
    descriptions_file: str | None = None
    fallback_templates: str = "imagenet80"
    view_augment_ops: int = 2
    view_augment_magnitude: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("image_adapter_ratio", "text_adapter_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.adapter_reduction < 1:
            raise ValueError(f"adapter_reduction must be >= 1, got {self.adapter_reduction!r}")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {self.consistency_weight!r}")
        if self.descriptions_file is not None and not self.descriptions_file.strip():
            raise ValueError("descriptions_file must be a path or None")
        get_ensemble(self.fallback_templates)
        if self.view_augment_ops < 0:
            raise ValueError(f"view_augment_ops must be >= 0, got {self.view_augment_ops!r}")
        if not 0 <= self.view_augment_magnitude <= 30:
            raise ValueError(f"view_augment_magnitude must be in [0, 30], got {self.view_augment_magnitude!r}")


def output_adapter(width: int, reduction: int, device: torch.device) -> nn.Sequential:
    """CoPrompt's adapter ``(N, E) -> (N, E)``: two bias-free linear layers, each followed by ReLU."""
    hidden = width // reduction
    return nn.Sequential(
        nn.Linear(width, hidden, bias=False, device=device),
        nn.ReLU(),
        nn.Linear(hidden, width, bias=False, device=device),
        nn.ReLU(),
    )


def _name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def load_descriptions(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a description file: a JSON object mapping class name -> list of sentences.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid JSON, or a value that is not a non-empty list of strings.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"descriptions_file {str(path)!r} not found; pass a JSON file mapping class names to lists of "
            "sentences, or --set descriptions_file=none to use the template ensemble"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"descriptions_file {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"descriptions_file {str(path)!r} must contain a JSON object, got a {type(data).__name__}")
    for name, sentences in data.items():
        if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
            raise ValueError(
                f"descriptions_file {str(path)!r}: class {name!r} must map to a non-empty list of strings, "
                f"got {sentences!r:.80}"
            )
    return data


def match_descriptions(descriptions: Mapping[str, Sequence[str]], classnames: Sequence[str]) -> list[list[str]]:
    """Look up the description sentences of each class; names match ignoring case, underscores and spaces.

    Raises:
        ValueError: a class has no entry.
    """
    by_key = {_name_key(name): list(sentences) for name, sentences in descriptions.items()}
    missing = [name for name in classnames if _name_key(name) not in by_key]
    if missing:
        raise ValueError(
            f"the descriptions have no entry for {len(missing)} of {len(classnames)} classes, e.g. {missing[:5]}; "
            f"known names include {sorted(descriptions)[:5]}"
        )
    return [by_key[_name_key(name)] for name in classnames]


@register_method(
    "coprompt",
    config_class=CoPromptConfig,
    train_defaults=TrainConfig(epochs=8, batch_size=4, lr=0.0035),
    dataset_train_overrides={"food101": {"epochs": 5}},
    dataset_config_overrides=COPROMPT_DATASET_OVERRIDES,
    citation="Consistency-guided Prompt Learning for Vision-Language Models, https://arxiv.org/abs/2306.01195",
)
class CoPrompt(MaPLe):
    """Consistency-guided Prompt Learning for Vision-Language Models (https://arxiv.org/abs/2306.01195).

    MaPLe's coupled prompts, plus two adapters on the outputs, ``Linear(E, E/4) - ReLU -
    Linear(E/4, E) - ReLU`` without biases, mixed in as ``0.1 * A_img(f) + 0.9 * f`` and
    ``0.2 * A_txt(g) + 0.8 * g``. The loss is
    ``CE + W * [(1 - cos(text, description)) + (1 - cos(image of view 1, frozen image of view 2))]``:

    - text: the adapted class text features against the frozen features of one description per
      class. Each step draws one random description index for all classes, and a class with fewer
      descriptions uses the index modulo its count. Descriptions come from
      ``ClassSet.descriptions`` or ``descriptions_file``. Without either, the target is the
      normalized ``fallback_templates`` ensemble, and a warning says so.
    - image: the adapted prompted features of view 1 against the frozen features of view 2,
      both from the same backbone (without prompts under no_grad for the frozen ones).

    Defaults: n_ctx 2, depth 9, W 1.0, SGD 0.0035, batch 4, 8 epochs; the run harness applies
    the reference's per-dataset depth / n_ctx / W table (``COPROMPT_DATASET_OVERRIDES``) and 5
    epochs on Food101, and ``--set`` overrides both.

    Two views: ``loss_terms`` accepts ``(B, 2, 3, H, W)`` with both views prepared by the data
    pipeline, or ``(B, 3, H, W)``, the batch of the usual training transform. In the second case
    view 1 is the batch and view 2 is RandAugment(2, 10) (torchvision) of each of its images.
    NOTE: the reference feeds two independent RandAugment(2, 10) views of a 224 x 224 resize
    (Dassl's RandAugment, no crop). Here view 1 has the random resized crop and flip of the
    standard transform, view 2 shares that crop, and torchvision's RandAugment operations differ
    from Dassl's.

    Limitations: as MaPLe (ViT image tower, TextTransformer text tower, any class set, fully
    global state). The description features are encoded on the first training step of each
    class set (classes x descriptions prompts).
    """

    def __init__(self, backbone: ClipBackbone, config: CoPromptConfig) -> None:
        super().__init__(backbone, config)
        width, device = backbone.embed_dim, self.ctx.device
        self.image_adapter = output_adapter(width, config.adapter_reduction, device)
        self.text_adapter = output_adapter(width, config.adapter_reduction, device)
        self.register_buffer("description_features", torch.empty(0), persistent=False)
        # A plain attribute, not a submodule: the augmentation has no state to save.
        augment = v2.RandAugment(num_ops=config.view_augment_ops, magnitude=config.view_augment_magnitude)
        object.__setattr__(self, "_view_augment", augment)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        super()._build_class_buffers(classes)
        self.description_features = torch.empty(0, device=self.ctx.device)  # rebuilt lazily

    # ------------------------------------------------------------------------------------------
    # Forward

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted prompted image features ``(B, E)`` and class text features ``(K, E)``."""
        image_features, text_features = super().features(images)
        image_ratio, text_ratio = self.config.image_adapter_ratio, self.config.text_adapter_ratio
        image_features = image_ratio * self.image_adapter(image_features) + (1 - image_ratio) * image_features
        text_features = text_ratio * self.text_adapter(text_features) + (1 - text_ratio) * text_features
        return image_features, text_features

    # ------------------------------------------------------------------------------------------
    # Consistency targets

    def _resolve_descriptions(self, classes: ClassSet) -> Mapping[str, Sequence[str]] | None:
        if classes.descriptions is not None:
            return classes.descriptions
        path = self.config.descriptions_file
        if path is None:
            return None
        if "{dataset}" in path:
            if classes.dataset is None:
                raise ValueError(
                    f"descriptions_file {path!r} contains {{dataset}} but the class set has no dataset name"
                )
            path = path.replace("{dataset}", classes.dataset)
        return load_descriptions(path)

    @torch.no_grad()
    def _encode_descriptions(self, classes: ClassSet) -> Tensor:
        descriptions = self._resolve_descriptions(classes)
        if descriptions is None:
            logger.warning(
                "CoPrompt: no class descriptions (descriptions_file is unset); the text consistency target is "
                "the %s template ensemble",
                self.config.fallback_templates,
            )
            templates = get_ensemble(self.config.fallback_templates)
            features = template_ensemble_features(
                self.backbone, classes, templates, normalize_each=True, chunk_size=self.config.text_chunk_size
            )
            return features.unsqueeze(0)  # (1, K, E)
        per_class = match_descriptions(descriptions, classes.classnames)
        sentences = [sentence for class_sentences in per_class for sentence in class_sentences]
        encoded = encode_texts(self.backbone, sentences, normalize=True, chunk_size=self.config.text_chunk_size)
        rows, start = [], 0
        count = max(len(class_sentences) for class_sentences in per_class)
        for class_sentences in per_class:
            n = len(class_sentences)
            index = torch.arange(count, device=encoded.device) % n + start
            rows.append(encoded[index])  # (N, E)
            start += n
        return torch.stack(rows, dim=1).float()  # (N, K, E)

    def description_targets(self) -> Tensor:
        """Normalized frozen text targets ``(N, K, E)``, N descriptions per class, cached per class set."""
        if self.description_features.numel() == 0:
            classes = self.require_classes()
            # The cache outlives this step, so it is computed in fp32 whatever the caller's autocast.
            with torch.autocast(device_type=self.device.type, enabled=False):
                self.description_features = self._encode_descriptions(classes)
        return self.description_features

    @torch.no_grad()
    def second_view(self, images: Tensor) -> Tensor:
        """RandAugment of each normalized image ``(B, 3, H, W)``, returned normalized."""
        if self.config.view_augment_ops == 0:
            return images
        visual = self.backbone.visual
        mean = torch.tensor(getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN, device=images.device)
        std = torch.tensor(getattr(visual, "image_std", None) or OPENAI_DATASET_STD, device=images.device)
        mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
        pixels = ((images.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
        augmented = torch.stack([self._view_augment(image) for image in pixels])  # (B, 3, H, W)
        return ((augmented.float() / 255 - mean) / std).to(images.dtype)

    def split_views(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Views 1 and 2 ``(B, 3, H, W)`` of a ``(B, 2, 3, H, W)`` or ``(B, 3, H, W)`` batch."""
        if images.dim() == 5:
            if images.shape[1] != 2:
                raise ValueError(f"CoPrompt expects 2 views per image, got a batch of shape {tuple(images.shape)}")
            return images[:, 0], images[:, 1]
        return images, self.second_view(images)

    def loss_terms(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        view1, view2 = self.split_views(images)
        image_features, text_features = self.features(view1)  # (B, E), (K, E)
        logits = self.cosine_logits(image_features, text_features)  # (B, K)
        terms = {"ce": F.cross_entropy(logits, labels)}
        weight = self.config.consistency_weight
        if weight:
            targets = self.description_targets()  # (N, K, E)
            index = int(torch.randint(targets.shape[0], ()))
            frozen_image = self.frozen_image_features(view2)  # (B, E)
            terms["text_consistency"] = weight * cosine_consistency(text_features, targets[index])
            terms["image_consistency"] = weight * cosine_consistency(image_features, frozen_image)
        return logits, terms

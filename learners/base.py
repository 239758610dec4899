"""The learner contract every prompt-learning method implements.

A learner is an ``nn.Module`` holding only its learnable prompt state (and non-persistent buffers
derived from class names). The frozen :class:`~learners.backbone.ClipBackbone` is referenced, not
registered, so ``state_dict()``, ``parameters()``, ``deepcopy`` and federated payloads never
contain CLIP's weights.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import ClipBackbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassSet:
    """The classes a learner scores, as plain data.

    Attributes:
        classnames: one name per label, index == label, with spaces (no underscores).
        template: the dataset's hand-crafted prompt template, e.g. ``"a photo of a {}."``.
        dataset: CoOp config name of the dataset (``eurosat``...), for methods with per-dataset
            tables (TCP's templates, CoPrompt's overrides); None when unknown.
        descriptions: class name -> description sentences (CoPrompt), or None.
    """

    classnames: tuple[str, ...]
    template: str = "a photo of a {}."
    dataset: str | None = None
    descriptions: Mapping[str, Sequence[str]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.classnames:
            raise ValueError("a class set needs at least one class name")
        if "{}" not in self.template:
            raise ValueError(f"template {self.template!r} has no '{{}}' placeholder for the class name")
        object.__setattr__(self, "classnames", tuple(n.replace("_", " ") for n in self.classnames))

    def prompts(self, template: str | None = None) -> list[str]:
        """The hand-crafted prompt of every class."""
        return [(template or self.template).format(name) for name in self.classnames]

    def __len__(self) -> int:
        return len(self.classnames)


FROZEN_TEXT_CHUNK = 1024  # prompts per frozen text pass when no chunk size is configured


@torch.no_grad()
def encode_texts(backbone: ClipBackbone, texts: Sequence[str], normalize: bool, chunk_size: int | None = None) -> Tensor:
    """Frozen text features ``(N, E)`` of plain-text prompts, fp32, encoded ``chunk_size`` at a time.

    Tokenizing and embedding are chunked too, so thousands of prompts (templates x classes,
    descriptions x classes) never hold all their ``(N, L, D)`` token embeddings at once.
    """
    chunk = chunk_size or FROZEN_TEXT_CHUNK
    parts = [backbone.encode_prompts(texts[i : i + chunk], normalize=normalize) for i in range(0, len(texts), chunk)]
    return torch.cat(parts).float()  # (N, E)


@torch.no_grad()
def template_ensemble_features(
    backbone: ClipBackbone,
    classes: ClassSet,
    templates: Sequence[str],
    normalize_each: bool,
    chunk_size: int | None = None,
) -> Tensor:
    """Normalized mean over templates of the frozen class text features: ``(K, E)``.

    All templates x classes prompts are encoded in chunked batches, not one template at a time.

    Args:
        normalize_each: L2-normalize each template's features before the mean, as CLIP's prompt
            ensembling does. PromptSRC averages the unnormalized features instead.
    """
    texts = [template.format(name) for template in templates for name in classes.classnames]
    features = encode_texts(backbone, texts, normalize_each, chunk_size)  # (T*K, E)
    features = features.view(len(templates), len(classes), -1)  # (T, K, E)
    return F.normalize(features.mean(dim=0), dim=-1)  # (K, E)


class PromptLearner(nn.Module):
    """Base class of every method.

    Subclasses implement :meth:`_build_class_buffers` (called by :meth:`set_classnames`) and
    :meth:`forward`; methods with extra loss terms override :meth:`loss_terms`.

    Methods whose image tower carries no prompt set ``uses_frozen_image_features`` and implement
    :meth:`forward_features` (and :meth:`loss_terms_features` for extra terms) instead of
    :meth:`forward`: their input is what :meth:`frozen_image_features` returns, so the training
    loop can feed features computed once and cached instead of pixels.

    Attributes:
        method_name: registry name, set by ``register_method``.
        config_class: the method's config dataclass, set by ``register_method``.
        local_state_prefixes: state-dict key prefixes that stay on a federated client
            (personalized state); every other learnable key is global.
        uses_frozen_image_features: the learner reads images only through
            :meth:`frozen_image_features`, so those features can be precomputed.
        frozen_feature_kind: names what :meth:`frozen_image_features` returns (part of the
            feature cache key): ``pooled`` for ``(B, E)``, ``pooled+local`` for ``(B, P, E)``.
    """

    method_name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    local_state_prefixes: ClassVar[tuple[str, ...]] = ()
    uses_frozen_image_features: ClassVar[bool] = False
    frozen_feature_kind: ClassVar[str] = "pooled"

    def __init__(self, backbone: ClipBackbone, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(config).__name__}")
        # Stored outside nn.Module's registries on purpose: see the module docstring.
        object.__setattr__(self, "backbone", backbone)
        self.config = config
        self.classes: ClassSet | None = None
        self._text_memo: dict[Any, Tensor] | None = None

    # ------------------------------------------------------------------------------------------
    # Contract

    def set_classnames(self, classes: ClassSet) -> None:
        """Rebuild every class-dependent buffer for ``classes``; learnable state is untouched."""
        if not isinstance(classes, ClassSet):
            raise TypeError(f"set_classnames expects a ClassSet, got {type(classes).__name__}")
        if self.classes == classes:
            return
        self.classes = classes
        self._build_class_buffers(classes)

    def _build_class_buffers(self, classes: ClassSet) -> None:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, K)`` over the current class set."""
        if self.uses_frozen_image_features:
            return self.forward_features(self.frozen_image_features(images))
        raise NotImplementedError

    def loss_terms(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Training forward: logits ``(B, K)`` and the weighted loss terms, cross-entropy first.

        The training loss is the sum of the terms; results and logs report each one.
        """
        if self.uses_frozen_image_features:
            return self.loss_terms_features(self.frozen_image_features(images), labels)
        logits = self(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}

    # ------------------------------------------------------------------------------------------
    # Precomputed image features (learners with ``uses_frozen_image_features``)

    @torch.no_grad()
    def frozen_image_features(self, images: Tensor) -> Tensor:
        """Encode ``(B, 3, H, W)`` images with the frozen, unprompted image tower: ``(B, E)``."""
        return self.backbone.encode_image(images)

    def forward_features(self, features: Tensor) -> Tensor:
        """Logits ``(B, K)`` from the output of :meth:`frozen_image_features`."""
        raise NotImplementedError(
            f"{type(self).__name__} encodes images with prompts, so it cannot score precomputed image features"
        )

    def loss_terms_features(self, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`loss_terms` from the output of :meth:`frozen_image_features`."""
        logits = self.forward_features(features)
        return logits, {"ce": F.cross_entropy(logits, labels)}

    # ------------------------------------------------------------------------------------------
    # Class text features reused across evaluation batches

    @contextmanager
    def reuse_text_features(self) -> Iterator[None]:
        """Compute each class text feature once inside the ``with`` block and reuse it.

        Only for passes that change neither the learnable state nor the class set, such as an
        evaluation pass: :meth:`memoized_text_features` recomputes nothing until the block ends.
        Without gradients only, so training steps always see the current parameters.
        """
        previous = self._text_memo
        self._text_memo = {}
        try:
            yield
        finally:
            self._text_memo = previous

    def memoized_text_features(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        """Return ``compute()``, computed once per :meth:`reuse_text_features` block.

        Outside such a block, or with gradients enabled, this simply calls ``compute``. The
        memo is keyed by ``name``, the class set and the autocast state.
        """
        memo = self._text_memo
        if memo is None or torch.is_grad_enabled():
            return compute()
        device_type = self.device.type
        autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
        key = (name, self.classes, autocast)
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def on_epoch_end(self, epoch: int, num_epochs: int) -> None:
        """Hook called by the training loop after every epoch (prompt aggregation, schedules)."""

    # ------------------------------------------------------------------------------------------
    # Learnable state

    def require_classes(self) -> ClassSet:
        if self.classes is None:
            raise RuntimeError(f"{type(self).__name__}: call set_classnames(...) before forward")
        return self.classes

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def learnable_state_dict(self) -> dict[str, Tensor]:
        """The state a checkpoint holds: every persistent parameter and buffer of the learner."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def split_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Learnable state split into (global, local) parts for federated rounds."""
        state = self.learnable_state_dict()
        local = {k: v for k, v in state.items() if k.startswith(self.local_state_prefixes)}
        shared = {k: v for k, v in state.items() if k not in local}
        return shared, local

    def load_learnable_state_dict(self, state: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load learnable state; with ``strict`` any missing, unexpected or mis-shaped key raises."""
        own = self.state_dict()
        if strict:
            missing = sorted(set(own) - set(state))
            unexpected = sorted(set(state) - set(own))
            shapes = sorted(
                f"{k}: checkpoint {tuple(state[k].shape)} vs learner {tuple(own[k].shape)}"
                for k in set(own) & set(state)
                if tuple(own[k].shape) != tuple(state[k].shape)
            )
            if missing or unexpected or shapes:
                raise ValueError(
                    f"learnable state does not match {self.method_name or type(self).__name__}: "
                    f"missing keys {missing}, unexpected keys {unexpected}, shape mismatches {shapes}. "
                    "The checkpoint was saved by another method, backbone, context length or class set"
                )
        self.load_state_dict(dict(state), strict=strict)

    def __deepcopy__(self, memo: dict) -> "PromptLearner":
        # Copy the learner, share the frozen backbone (LwF and GPA deep-copy the model).
        memo[id(self.backbone)] = self.backbone
        cls = type(self)
        clone = cls.__new__(cls)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            object.__setattr__(clone, key, copy.deepcopy(value, memo))
        return clone

    # ------------------------------------------------------------------------------------------
    # Helpers shared by the methods

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def class_prompt_features(self, classes: ClassSet, templates: Sequence[str] | None = None) -> Tensor:
        """Frozen, L2-normalized text features ``(K, E)`` of hand-crafted prompts.

        With several templates, each template's features are normalized, averaged over
        templates and normalized again, as CLIP's prompt ensembling does.
        """
        return template_ensemble_features(self.backbone, classes, templates or [classes.template], normalize_each=True)

    def cosine_logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """``logit_scale * cos``: ``(B, E) x (K, E) -> (B, K)``."""
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        return self.backbone.logit_scale * image_features @ text_features.t()

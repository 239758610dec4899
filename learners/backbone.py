"""Frozen open_clip backbone with prompt-aware text and image encoders.

The adapter wraps an open_clip model without copying or patching any of its code: the encoders
below call the model's own embedding layers, iterate its ``resblocks`` one by one and apply its
own final norms, projections and pooling rule. Prompt learners feed token embeddings instead of
token ids and may replace token slots at the input of chosen blocks ("deep prompts").

Shape letters: B images, K sequences (class prompts), M prompt tokens, L token positions,
D tower width, E joint embedding width, P patch tokens plus the class token.
"""

from __future__ import annotations

import logging
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered_configs = False

OPENAI_CLIP_CACHE = Path("~/.cache/clip").expanduser()

LENGTH_BUCKETS = 8
"""Truncated text passes split their sequences into up to this many groups of similar length."""
MIN_BUCKET_SIZE = 16
"""Smallest group of a length split, so that small class sets run in one pass."""


def register_model_configs() -> None:
    """Register the project's open_clip model configs (``toy-clip``) once per process."""
    global _registered_configs
    if not _registered_configs:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered_configs = True


@dataclass(frozen=True)
class TokenReplacement:
    """Prompt tokens that overwrite token slots at the input of one transformer block.

    Attributes:
        tokens: ``(M, D)`` shared by every sequence, or ``(K, M, D)`` one row per sequence.
        start: index of the first replaced slot; negative values count from the end, so
            ``-M`` addresses the last M tokens (where vision prompts sit).
        weight: blend weight; the slots become ``weight * tokens + (1 - weight) * current``.
    """

    tokens: Tensor
    start: int
    weight: float = 1.0


def replace_tokens(x: Tensor, replacement: TokenReplacement) -> Tensor:
    """Return ``x`` (N, L, D) with the slots of ``replacement`` overwritten (out of place)."""
    n, length, _ = x.shape
    tokens = replacement.tokens.to(x.dtype)
    m = tokens.shape[-2]
    start = replacement.start if replacement.start >= 0 else length + replacement.start
    if start < 0 or start + m > length:
        raise ValueError(
            f"prompt slots [{replacement.start}, {replacement.start}+{m}) do not fit in a sequence of "
            f"{length} tokens"
        )
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(n, -1, -1)  # (N, M, D)
    elif tokens.shape[0] != n:
        raise ValueError(f"per-sequence prompts have {tokens.shape[0]} rows for {n} sequences")
    current = x[:, start : start + m]  # (N, M, D)
    if replacement.weight != 1.0:
        tokens = replacement.weight * tokens + (1.0 - replacement.weight) * current
    return torch.cat([x[:, :start], tokens, x[:, start + m :]], dim=1)  # (N, L, D)


def _slice_replacement(replacement: TokenReplacement, rows: Tensor) -> TokenReplacement:
    if replacement.tokens.dim() == 2:
        return replacement
    return TokenReplacement(replacement.tokens[rows], replacement.start, replacement.weight)


@dataclass(frozen=True)
class TextMemoryOptions:
    """Defaults that bound the memory of text-tower passes (see :meth:`ClipBackbone.text_memory`).

    Attributes:
        chunk_size: encode at most this many sequences per pass; a method's own smaller
            ``chunk_size`` argument wins. None leaves chunking to the method.
        checkpoint: recompute each text block's activations in the backward pass instead of
            keeping them (``torch.utils.checkpoint``), whenever gradients flow into the tower.
        truncate: False runs every pass over all L token positions, ignoring the methods'
            ``truncate`` argument; only for measuring what truncation saves (bench_speed.py).
    """

    chunk_size: int | None = None
    checkpoint: bool = False
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"text chunk size must be >= 1 or None, got {self.chunk_size!r}")


class PretrainedWeightsError(RuntimeError):
    """Raised when the requested pretrained weights cannot be found or read."""


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


class ClipBackbone:
    """A frozen open_clip model plus the tokenizer and the prompt-aware encoders.

    The backbone is deliberately not an ``nn.Module`` attribute of the learners that use it: it is
    shared (one copy per process for every learner and federated client), never saved in a
    learner checkpoint and never handed to an optimizer. Its towers stay in eval mode with
    ``requires_grad=False``.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` model.
        tokenizer: the open_clip tokenizer of that model.
        model_name: open_clip model name, recorded in checkpoints and results.
        pretrained: pretrained tag or file, recorded in checkpoints and results.
    """

    def __init__(self, model: nn.Module, tokenizer, model_name: str, pretrained: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.pretrained = pretrained
        model.eval()
        model.requires_grad_(False)

        text = getattr(model, "text", None)
        if text is not None and not hasattr(text, "resblocks") and not hasattr(text, "transformer"):
            raise NotImplementedError(
                f"{type(text).__name__} text towers (Hugging Face encoders) are not supported: prompt "
                "learners need an open_clip TextTransformer with token embeddings and resblocks"
            )
        # open_clip's CLIP keeps the text modules on the root; CustomTextCLIP under `.text`.
        self._text = text if text is not None else model
        if getattr(self._text, "cls_emb", None) is not None:
            raise NotImplementedError("text towers with a class embedding (CoCa) are not supported")
        self.text_pool_type: str = getattr(self._text, "text_pool_type", None) or getattr(self._text, "pool_type")
        self.text_eos_id = getattr(self._text, "text_eos_id", None) or getattr(self._text, "eos_id", None)
        self.visual = model.visual
        self.is_vit = isinstance(self.visual, open_clip.transformer.VisionTransformer)
        self.text_memory_options = TextMemoryOptions()

    # ----------------------------------------------------------------------------------------
    # Sizes and devices

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self._text.token_embedding.weight.dtype

    @property
    def text_width(self) -> int:
        return self._text.token_embedding.weight.shape[1]

    @property
    def vision_width(self) -> int:
        if not self.is_vit:
            raise NotImplementedError("vision prompts need a ViT image tower")
        return self.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    @property
    def text_layers(self) -> int:
        return len(self._text.transformer.resblocks)

    @property
    def vision_layers(self) -> int:
        if not self.is_vit:
            raise NotImplementedError("vision prompts need a ViT image tower")
        return len(self.visual.transformer.resblocks)

    @property
    def image_size(self) -> int:
        size = getattr(self.visual, "image_size", 224)
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return self._text.positional_embedding.shape[0]

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned temperature, exponentiated (100 for OpenAI CLIP); frozen."""
        return self.model.logit_scale.exp()

    def to(self, device: torch.device | str) -> "ClipBackbone":
        self.model.to(device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ----------------------------------------------------------------------------------------
    # Text

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Tokenize to ``(K, L)`` ids on the backbone's device, L = the model's context length."""
        return self.tokenizer(list(texts)).to(self.device)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """Embed token ids ``(K, L)`` to ``(K, L, D)`` without positional embeddings."""
        return self._text.token_embedding(ids)

    def eot_index(self, ids: Tensor) -> Tensor:
        """Position ``(K,)`` of the token the model pools (end of text for CLIP)."""
        if self.text_pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.text_pool_type == "eos":
            return (ids == self.text_eos_id).int().argmax(dim=-1)
        if self.text_pool_type == "first":
            return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        if self.text_pool_type == "last":
            return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        raise NotImplementedError(f"text pool type {self.text_pool_type!r} is not supported")

    @contextmanager
    def text_memory(
        self, chunk_size: int | None = None, checkpoint: bool = False, truncate: bool = True
    ) -> Iterator[TextMemoryOptions]:
        """Bound the memory of every text-tower pass inside the ``with`` block.

        The training loop enters this around each forward, so every method's text path gets the
        same bound without a config field of its own.

        Args:
            chunk_size: encode at most this many sequences per pass (None: the method decides).
            checkpoint: recompute block activations in the backward pass instead of storing them.
            truncate: False turns truncation off for every pass (see :class:`TextMemoryOptions`).
        """
        previous = self.text_memory_options
        self.text_memory_options = TextMemoryOptions(chunk_size, checkpoint, truncate)
        try:
            yield self.text_memory_options
        finally:
            self.text_memory_options = previous

    def encode_text_tokens(
        self,
        embeddings: Tensor,
        eot_index: Tensor,
        deep: Mapping[int, TokenReplacement] | None = None,
        truncate: bool = True,
        chunk_size: int | None = None,
        normalize: bool = False,
        checkpoint: bool | None = None,
    ) -> Tensor:
        """Encode token embeddings to joint-space text features.

        Args:
            embeddings: ``(K, L, D)`` token embeddings, prompts already in place, no positions.
            eot_index: ``(K,)`` position pooled for each sequence (see :meth:`eot_index`).
            deep: block index -> tokens that replace slots at the input of that block.
            truncate: run the transformer only up to the longest pooled position. The mask is
                causal, so positions after it cannot change the pooled token: this is exact.
            chunk_size: encode at most this many sequences at once, bounding activation memory.
                The smaller of this and the :meth:`text_memory` chunk size applies. With
                ``truncate``, sequences are also split into up to ``LENGTH_BUCKETS`` groups of
                at least ``MIN_BUCKET_SIZE``, ordered by length, and each group stops at its own
                longest pooled position. For "a photo of a {}." over open_clip's 1,000 ImageNet
                class names that is 1.8 times fewer token positions than one padded pass.
            normalize: L2-normalize the output.
            checkpoint: recompute each block in the backward pass (``torch.utils.checkpoint``)
                instead of storing its activations; None follows :meth:`text_memory`. Only
                takes effect when gradients flow into the tower.

        Returns:
            ``(K, E)`` text features.
        """
        options = self.text_memory_options
        if options.chunk_size is not None:
            chunk_size = options.chunk_size if chunk_size is None else min(chunk_size, options.chunk_size)
        if checkpoint is None:
            checkpoint = options.checkpoint
        truncate = truncate and options.truncate and self.text_pool_type != "last"
        k = embeddings.shape[0]
        if truncate:
            bucket = max(MIN_BUCKET_SIZE, -(-k // LENGTH_BUCKETS))
            chunk_size = bucket if chunk_size is None or chunk_size <= 0 else min(chunk_size, bucket)
        if chunk_size is None or chunk_size <= 0 or k <= chunk_size:
            return self._encode_text_chunk(embeddings, eot_index, deep, truncate, normalize, checkpoint)

        # Shortest sequences first: with truncation each chunk stops at its own longest pooled
        # position, so a few long class names do not pad every other prompt.
        order = torch.argsort(eot_index, stable=True) if truncate else torch.arange(k, device=eot_index.device)
        parts = []
        for begin in range(0, k, chunk_size):
            rows = order[begin : begin + chunk_size]
            part_deep = {i: _slice_replacement(r, rows) for i, r in (deep or {}).items()}
            parts.append(self._encode_text_chunk(embeddings[rows], eot_index[rows], part_deep, truncate, normalize, checkpoint))
        features = torch.cat(parts, dim=0)  # (K, E), sorted order
        return features[torch.argsort(order)]  # (K, E)

    def _encode_text_chunk(
        self,
        embeddings: Tensor,
        eot_index: Tensor,
        deep: Mapping[int, TokenReplacement] | None,
        truncate: bool,
        normalize: bool,
        checkpoint: bool,
    ) -> Tensor:
        text = self._text
        k = embeddings.shape[0]
        length = embeddings.shape[1]
        if truncate:
            length = int(eot_index.max().item()) + 1
            if deep and any(r.start < 0 for r in deep.values()):
                # Slots counted from the end would move onto other tokens if the sequence were cut.
                length = embeddings.shape[1]
            elif deep:
                slot_end = max(r.start + r.tokens.shape[-2] for r in deep.values())
                length = max(length, slot_end)
        cast_dtype = text.transformer.get_cast_dtype()
        x = embeddings[:, :length].to(cast_dtype) + text.positional_embedding[:length].to(cast_dtype)  # (K, L, D)
        attn_mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        for i, block in enumerate(text.transformer.resblocks):
            if deep and i in deep:
                x = replace_tokens(x, deep[i])  # (K, L, D)
            if checkpoint and torch.is_grad_enabled() and x.requires_grad:
                # Only the block input is kept; the backward pass reruns the block (under the
                # autocast state of the forward, which torch.utils.checkpoint restores).
                x = activation_checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        x = text.ln_final(x)  # (K, L, D)
        x = x[torch.arange(k, device=x.device), eot_index]  # (K, D)
        projection = text.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection  # (K, E)
        return F.normalize(x, dim=-1) if normalize else x

    @torch.no_grad()
    def encode_prompts(self, texts: Sequence[str], normalize: bool = True, chunk_size: int | None = None) -> Tensor:
        """Encode plain text prompts with the frozen text tower: ``(K, E)``."""
        ids = self.tokenize(texts)
        return self.encode_text_tokens(
            self.token_embedding(ids), self.eot_index(ids), chunk_size=chunk_size, normalize=normalize
        )

    # ----------------------------------------------------------------------------------------
    # Images

    def encode_image(
        self,
        images: Tensor,
        prompts: Tensor | None = None,
        deep: Mapping[int, TokenReplacement] | None = None,
        normalize: bool = False,
        return_tokens: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Encode images, optionally with vision prompt tokens.

        Args:
            images: ``(B, 3, H, W)`` normalized pixels.
            prompts: ``(M, D)`` or ``(B, M, D)`` tokens appended after the patch tokens, before
                ``ln_pre``.
            deep: block index -> tokens replacing the last M tokens at that block's input.
            normalize: L2-normalize the pooled output.
            return_tokens: also return the patch tokens after ``ln_post`` and the projection.

        Returns:
            ``(B, E)`` image features, and ``(B, P - 1, E)`` patch features with return_tokens.
        """
        if not self.is_vit:
            if prompts is not None or deep:
                raise NotImplementedError(
                    f"vision prompts need a ViT image tower; {type(self.visual).__name__} has no token sequence"
                )
            if return_tokens:
                raise NotImplementedError("patch tokens are only available on ViT image towers")
            x = self.visual(images)
            return F.normalize(x, dim=-1) if normalize else x

        visual = self.visual
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type not in ("tok", "avg"):
            raise NotImplementedError("ViT towers with attentional pooling are not supported")
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, P-1, D)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, P, D)
        x = visual.patch_dropout(x)
        n_prompts = 0
        if prompts is not None:
            prompts = prompts.to(x.dtype)
            if prompts.dim() == 2:
                prompts = prompts.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, M, D)
            n_prompts = prompts.shape[1]
            x = torch.cat([x, prompts], dim=1)  # (B, P+M, D)
        x = visual.ln_pre(x)
        for i, block in enumerate(visual.transformer.resblocks):
            if deep and i in deep:
                x = replace_tokens(x, deep[i])  # (B, P+M, D)
            x = block(x)
        if n_prompts:
            x = x[:, : x.shape[1] - n_prompts]  # (B, P, D)
        if visual.final_ln_after_pool:
            pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
            pooled = visual.ln_post(pooled)
            tokens = visual.ln_post(x[:, 1:])
        else:
            x = visual.ln_post(x)
            pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]  # (B, D)
            tokens = x[:, 1:]  # (B, P-1, D)
        if visual.proj is not None:
            pooled = pooled @ visual.proj  # (B, E)
            tokens = tokens @ visual.proj  # (B, P-1, E)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return (pooled, tokens) if return_tokens else pooled


# ------------------------------------------------------------------------------------------------
# Loading


def _hub_error(model_name: str, pretrained: str, error: Exception) -> PretrainedWeightsError:
    local = OPENAI_CLIP_CACHE / f"{model_name.replace('-quickgelu', '')}.pt"
    return PretrainedWeightsError(
        f"could not load pretrained weights {pretrained!r} for {model_name!r} from the open_clip hub "
        f"({type(error).__name__}: {error}). Without network access, pass a local weight file instead, "
        f"for example --pretrained {local} (the OpenAI checkpoint CoOp users keep in ~/.cache/clip), or "
        "--pretrained none for random weights"
    )


def load_backbone(
    model_name: str,
    pretrained: str | os.PathLike | None,
    device: torch.device | str = "cpu",
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ClipBackbone:
    """Build a frozen open_clip backbone.

    Args:
        model_name: any open_clip model name (``ViT-B-16``, ``RN50``, ``toy-clip``, ...).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...), a local
            checkpoint file (open_clip state dict or the OpenAI TorchScript ``ViT-B-16.pt``), or
            ``none``/``None`` for random weights.
        device: where the model lives.
        quick_gelu: force QuickGELU on or off. ``None`` turns it on for OpenAI weights (the
            ``openai`` tag or an OpenAI TorchScript file) and for configs that declare it.
        cache_dir: open_clip download cache.

    Raises:
        ValueError: unknown model name.
        PretrainedWeightsError: weights missing, unreadable or not reachable.
    """
    register_model_configs()
    known = open_clip.list_models()
    if model_name not in known:
        import difflib

        close = difflib.get_close_matches(model_name, known, n=5)
        raise ValueError(
            f"unknown open_clip model {model_name!r}; close matches: {close or 'none'}. "
            "See open_clip.list_models() for all names"
        )
    tag = "none" if pretrained is None else str(pretrained)
    tokenizer = open_clip.get_tokenizer(model_name)

    if tag.lower() == "none":
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=bool(quick_gelu))
    else:
        path = Path(tag).expanduser()
        is_file_like = path.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or os.sep in tag
        if path.is_file():
            model = _load_file(model_name, path, quick_gelu)
        elif is_file_like:
            raise PretrainedWeightsError(
                f"pretrained weight file {str(path)!r} not found. Pass an existing checkpoint file, an "
                f"open_clip tag (see open_clip.list_pretrained_tags_by_model({model_name!r})) or 'none'"
            )
        else:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if tag not in tags:
                raise PretrainedWeightsError(
                    f"unknown pretrained tag {tag!r} for {model_name!r}; known tags: {tags or 'none'}. "
                    "Pass a local checkpoint file or 'none' instead"
                )
            force = quick_gelu if quick_gelu is not None else (tag == "openai" or model_name.endswith("-quickgelu"))
            try:
                model = open_clip.create_model(
                    model_name, pretrained=tag, force_quick_gelu=force, cache_dir=cache_dir
                )
            except Exception as error:  # noqa: BLE001 - open_clip raises RuntimeError or hub errors
                raise _hub_error(model_name, tag, error) from error
    model = model.to(device)
    logger.info("loaded backbone %s (pretrained=%s) on %s", model_name, tag, device)
    return ClipBackbone(model, tokenizer, model_name, tag)


def _load_file(model_name: str, path: Path, quick_gelu: bool | None) -> nn.Module:
    openai_archive = _is_torchscript_archive(path)
    try:
        if openai_archive:
            # The OpenAI release files are TorchScript archives whose state dict uses the key
            # layout open_clip's CLIP module keeps; the model was trained with QuickGELU.
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for unreadable files
        raise PretrainedWeightsError(
            f"could not read weight file {str(path)!r} ({type(error).__name__}: {error}); the file is "
            "truncated, corrupt or not a torch checkpoint: download it again, or pass another file, an "
            "open_clip tag, or 'none'"
        ) from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"weight file {str(path)!r} contains a {type(state).__name__}, not a state dict; pass a state dict or TorchScript file")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state.pop(key, None)
    if quick_gelu is None:
        quick_gelu = openai_archive or bool(open_clip.get_model_config(model_name).get("quick_gelu", False))
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        raise PretrainedWeightsError(
            f"weight file {str(path)!r} does not match the open_clip model {model_name!r}: {error}. "
            "Pass the --model the checkpoint was trained with"
        ) from error
    return model

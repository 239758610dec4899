"""Text prompt assembly shared by the methods: fixed token embeddings around learnable context.

Shape letters: K class prompts, M context tokens, L token positions, D text width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from .backbone import ClipBackbone

ClassTokenPosition = Literal["end", "middle", "front"]


@dataclass
class PromptPieces:
    """Frozen token embeddings of K prompts split around M context slots.

    Attributes:
        prefix: ``(K, S, D)`` embeddings before the context (the start-of-text token, S = 1).
        suffix: ``(K, L - S - M, D)`` embeddings after the context (class name, period, EOT, pad).
        eot_index: ``(K,)`` pooled position of each prompt.
        name_lengths: ``(K,)`` class-name token counts (used by the middle and front positions).
    """

    prefix: Tensor
    suffix: Tensor
    eot_index: Tensor
    name_lengths: Tensor


def count_name_tokens(backbone: ClipBackbone, names: Sequence[str]) -> Tensor:
    """Number of tokens of each name, without start and end tokens: ``(K,)``."""
    ids = backbone.tokenize(list(names))
    return backbone.eot_index(ids) - 1


@torch.no_grad()
def build_prompt_pieces(
    backbone: ClipBackbone,
    prompts: Sequence[str],
    n_ctx: int,
    ctx_start: int = 1,
    classnames: Sequence[str] | None = None,
) -> PromptPieces:
    """Tokenize full prompt strings and cut out the ``n_ctx`` slots starting at ``ctx_start``.

    The strings carry placeholder words (``"X X X X dog."``) or the init phrase in the context
    slots; those token embeddings are dropped and replaced by the learnable context at assembly.
    """
    ids = backbone.tokenize(prompts)  # (K, L)
    embeddings = backbone.token_embedding(ids)  # (K, L, D)
    eot = backbone.eot_index(ids)
    if int(eot.min()) < ctx_start + n_ctx:
        raise ValueError(f"prompts are shorter than {n_ctx} context tokens: {list(prompts)[:3]}")
    names = classnames if classnames is not None else [""] * len(prompts)
    return PromptPieces(
        prefix=embeddings[:, :ctx_start].clone(),  # (K, S, D)
        suffix=embeddings[:, ctx_start + n_ctx :].clone(),  # (K, L-S-M, D)
        eot_index=eot,
        name_lengths=count_name_tokens(backbone, names) if classnames is not None else torch.zeros_like(eot),
    )


@torch.no_grad()
def phrase_embedding(backbone: ClipBackbone, phrase: str, n_tokens: int | None = None) -> tuple[Tensor, int]:
    """Token embeddings of an init phrase such as ``"a photo of a"``: ``(M, D)`` and M.

    With ``n_tokens`` only the first ``n_tokens`` tokens are returned (MaPLe keeps the rest of the
    phrase as fixed text).
    """
    ids = backbone.tokenize([phrase])
    length = int(backbone.eot_index(ids)[0]) - 1
    if n_tokens is not None:
        if n_tokens > length:
            raise ValueError(f"init phrase {phrase!r} has {length} tokens, fewer than n_ctx={n_tokens}")
        length = n_tokens
    embedding = backbone.token_embedding(ids)[0, 1 : 1 + length]  # (M, D)
    return embedding.clone(), length


def assemble_prompts(
    pieces: PromptPieces, ctx: Tensor, position: ClassTokenPosition = "end"
) -> Tensor:
    """Place the context between the frozen pieces.

    Args:
        pieces: frozen embeddings from :func:`build_prompt_pieces`.
        ctx: ``(M, D)`` shared context or ``(K, M, D)`` class-specific context.
        position: where the class name goes relative to the context.

    Returns:
        ``(K, L, D)`` prompt embeddings.
    """
    k = pieces.prefix.shape[0]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(k, -1, -1)  # (K, M, D)
    ctx = ctx.to(pieces.prefix.dtype)
    if position == "end":
        return torch.cat([pieces.prefix, ctx, pieces.suffix], dim=1)  # (K, L, D)
    if position not in ("middle", "front"):
        raise ValueError(f"class token position must be 'end', 'middle' or 'front', got {position!r}")
    half = ctx.shape[1] // 2
    rows = []
    for i in range(k):
        n = int(pieces.name_lengths[i])
        name = pieces.suffix[i : i + 1, :n]  # (1, n, D)
        rest = pieces.suffix[i : i + 1, n:]  # (1, L-S-M-n, D)
        if position == "middle":
            parts = [pieces.prefix[i : i + 1], ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest]
        else:
            parts = [pieces.prefix[i : i + 1], name, ctx[i : i + 1], rest]
        rows.append(torch.cat(parts, dim=1))  # (1, L, D)
    return torch.cat(rows, dim=0)  # (K, L, D)

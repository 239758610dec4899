"""N sets of learnable text context encoded for every class in one text-tower pass, and the base
class of the learners that match them to image features by optimal transport (PLOT, PLOT++).

Shape letters: N prompt sets, K classes, M context tokens, L token positions, D text width,
E joint embedding width.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backbone import ClipBackbone
from .base import PromptLearner
from .ot import transport_scores
from .prompts import ClassTokenPosition, PromptPieces, assemble_prompts, build_prompt_pieces


@torch.no_grad()
def build_prompt_set_pieces(
    backbone: ClipBackbone, prompts: Sequence[Sequence[str]], n_ctx: int, classnames: Sequence[str]
) -> PromptPieces:
    """Frozen pieces of the prompts of every set, cut short after the last pooled token.

    Args:
        backbone: the frozen backbone (tokenizer and token embedding).
        prompts: one list of K prompt strings per set, or a single list shared by every set. The
            context slots are the ``n_ctx`` tokens after the start token. What follows them (the
            class name, a period, and any words of an init phrase beyond ``n_ctx``) stays fixed.
        n_ctx: number of context slots M.
        classnames: the K class names (their token counts place the name for ``middle``/``front``).

    Returns:
        Pieces with ``len(prompts) * K`` rows, set-major. The suffix ends at the last pooled
        position of all rows: the text mask is causal, so later positions never change a pooled
        token, and dropping them saves most of the ``(N*K, L, D)`` prompt memory.
    """
    parts = [build_prompt_pieces(backbone, list(texts), n_ctx, classnames=classnames) for texts in prompts]
    eot_index = torch.cat([p.eot_index for p in parts])  # (N*K,)
    suffix_length = int(eot_index.max()) + 1 - 1 - n_ctx
    return PromptPieces(
        prefix=torch.cat([p.prefix for p in parts]),  # (N*K, 1, D)
        suffix=torch.cat([p.suffix[:, :suffix_length] for p in parts]),  # (N*K, L'-1-M, D)
        eot_index=eot_index,
        name_lengths=torch.cat([p.name_lengths for p in parts]),
    )


def encode_prompt_sets(
    backbone: ClipBackbone,
    pieces: PromptPieces,
    ctx: Tensor,
    num_classes: int,
    position: ClassTokenPosition = "end",
    chunk_size: int | None = None,
) -> Tensor:
    """Text features of N context sets for every class.

    Args:
        backbone: the frozen backbone.
        pieces: frozen pieces from :func:`build_prompt_set_pieces`, with K rows shared by every
            set or N*K rows (one block of K per set).
        ctx: ``(N, M, D)`` context of each set.
        num_classes: K.
        position: where the class name goes relative to the context.
        chunk_size: encode at most this many of the N*K prompts at once.

    Returns:
        ``(N, K, E)`` text features, not normalized.
    """
    n, m, d = ctx.shape
    rows = pieces.prefix.shape[0]
    if rows == num_classes and n > 1:
        pieces = PromptPieces(
            prefix=pieces.prefix.repeat(n, 1, 1),  # (N*K, 1, D)
            suffix=pieces.suffix.repeat(n, 1, 1),  # (N*K, L'-1-M, D)
            eot_index=pieces.eot_index.repeat(n),
            name_lengths=pieces.name_lengths.repeat(n),
        )
    elif rows != n * num_classes:
        raise ValueError(f"prompt pieces have {rows} rows, expected {num_classes} or {n}*{num_classes}")
    ctx_rows = ctx.unsqueeze(1).expand(n, num_classes, m, d).reshape(n * num_classes, m, d)  # (N*K, M, D)
    embeddings = assemble_prompts(pieces, ctx_rows, position)  # (N*K, L', D)
    features = backbone.encode_text_tokens(embeddings, pieces.eot_index, chunk_size=chunk_size)  # (N*K, E)
    return features.reshape(n, num_classes, -1)  # (N, K, E)


class PromptSetLearner(PromptLearner):
    """Base of the learners that score classes by transport between feature sets (PLOT, PLOT++).

    A subclass owns ``self.ctx`` ``(N, M, D)``, calls :meth:`set_prompt_pieces` from
    ``_build_class_buffers``, and has a config with the ``ot_*`` fields, ``text_chunk_size``
    and optionally ``class_token_position`` (``end`` when absent).
    """

    def __init__(self, backbone: ClipBackbone, config) -> None:
        super().__init__(backbone, config)
        for name in ("token_prefix", "token_suffix", "eot_index", "name_lengths"):
            self.register_buffer(name, torch.empty(0), persistent=False)

    def set_prompt_pieces(self, pieces: PromptPieces) -> None:
        """Store the frozen pieces from :func:`build_prompt_set_pieces` as non-persistent buffers."""
        self.token_prefix, self.token_suffix = pieces.prefix, pieces.suffix
        self.eot_index, self.name_lengths = pieces.eot_index, pieces.name_lengths

    def text_features(self) -> Tensor:
        """Text features ``(N, K, E)`` of every prompt set and class, not normalized; computed once
        per step (and once per evaluation pass, see :meth:`reuse_text_features`)."""
        return self.memoized_text_features("prompt_sets", self._encode_prompt_sets)

    def _encode_prompt_sets(self) -> Tensor:
        classes = self.require_classes()
        pieces = PromptPieces(self.token_prefix, self.token_suffix, self.eot_index, self.name_lengths)
        position = getattr(self.config, "class_token_position", "end")
        return encode_prompt_sets(self.backbone, pieces, self.ctx, len(classes), position, self.config.text_chunk_size)

    def transport_logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        """``logit_scale * sum(T * cos)`` of ``(B, M, E)`` image-side and ``(N, K, E)`` text
        features, with the config's Sinkhorn settings: ``(B, K)``."""
        config = self.config
        scores = transport_scores(
            features,
            text_features,
            epsilon=config.ot_epsilon,
            max_iter=config.ot_max_iter,
            tolerance=config.ot_tolerance,
            plan=config.ot_plan,
        )  # (B, K)
        return self.backbone.logit_scale * scores

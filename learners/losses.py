"""Regularizer terms written once and shared by the methods, plugins and federated clients.

Each function returns an unweighted scalar; callers multiply by their configured weight and
report the weighted value as a named loss term.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def knowledge_guided_distance(learned: Tensor, handcrafted: Tensor) -> Tensor:
    """KgCoOp's ``1 - mean_k cos(w_k, w_clip_k)`` between ``(K, E)`` class text features.

    For unit vectors this is a quarter of the mean squared Euclidean distance. It is zero when the
    learned features equal the hand-crafted ones.
    """
    learned = F.normalize(learned.float(), dim=-1)
    handcrafted = F.normalize(handcrafted.float(), dim=-1)
    return 1.0 - (learned * handcrafted).sum(dim=-1).mean()


def cosine_consistency(features: Tensor, targets: Tensor) -> Tensor:
    """``1 - mean cos`` between matching rows of two ``(N, E)`` feature sets (CoPrompt, BIP)."""
    return 1.0 - F.cosine_similarity(features.float(), targets.float(), dim=-1).mean()


def l1_consistency(features: Tensor, targets: Tensor) -> Tensor:
    """PromptSRC's L1: mean absolute difference between L2-normalized ``(N, E)`` features."""
    return F.l1_loss(F.normalize(features.float(), dim=-1), F.normalize(targets.float(), dim=-1), reduction="mean")


def logit_distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """PromptSRC's KL(teacher || student) over ``(B, K)`` logits, summed and divided by ``B * K``.

    The reference divides the summed KL by the number of logits, not by the batch size, which
    makes its effective weight K times smaller than a batch-mean KL.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="sum", log_target=True)
    return kl * (temperature**2) / student_logits.numel()

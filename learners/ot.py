"""Entropic optimal transport between feature sets, as PLOT and PLOT++ use it.

The plan is computed by Sinkhorn-Knopp scaling with uniform marginals, in float32 and without
gradients. The transport score ``sum(T * cos)`` is therefore differentiable through the cosine
matrix only.

Shape letters: B images, K classes, M features per image (local features or visual prompt sets),
N text prompt sets, J independent transport problems, E joint embedding width.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

TransportPlan = Literal["sinkhorn", "uniform"]
TRANSPORT_PLANS: tuple[str, ...] = ("sinkhorn", "uniform")


class TransportPlanError(FloatingPointError):
    """Raised when a Sinkhorn plan contains NaN or infinite entries."""


def validate_sinkhorn_settings(epsilon: float, max_iter: int, tolerance: float, plan: str) -> None:
    """Check the OT fields that PLOT and PLOT++ configs share.

    Raises:
        ValueError: naming the invalid field and value.
    """
    if not epsilon > 0:
        raise ValueError(f"ot_epsilon must be > 0, got {epsilon!r}; the published value is 0.1")
    if max_iter < 1:
        raise ValueError(f"ot_max_iter must be >= 1, got {max_iter!r}; the published value is 100")
    if tolerance < 0:
        raise ValueError(
            f"ot_tolerance must be >= 0 (0 runs all ot_max_iter iterations), got {tolerance!r}; "
            "the published value is 0.01"
        )
    if plan not in TRANSPORT_PLANS:
        raise ValueError(f"ot_plan must be one of {list(TRANSPORT_PLANS)}, got {plan!r}")


@torch.no_grad()
def sinkhorn(
    kernel: Tensor,
    row_marginal: Tensor,
    col_marginal: Tensor,
    max_iter: int = 100,
    tolerance: float = 1e-2,
) -> Tensor:
    """Scale a batch of Gibbs kernels into transport plans (Sinkhorn-Knopp).

    Starting from ``c = 1``, each iteration sets ``r = row_marginal / (K c)`` and then
    ``c = col_marginal / (K^T r)``. The loop stops after ``max_iter`` iterations, or earlier when
    the mean of ``|r - r_previous|`` over the whole batch falls below ``tolerance``. One
    tolerance for the batch is the PLOT reference's rule: a batch with one slow problem runs
    every problem longer. After the loop the column marginals are exact and the row marginals
    are approximate.

    Args:
        kernel: ``(J, M, N)`` positive kernel ``exp(-C / epsilon)``.
        row_marginal: ``(J, M)`` mass of each row.
        col_marginal: ``(J, N)`` mass of each column.
        max_iter: maximum number of scaling iterations.
        tolerance: stopping threshold on the mean change of ``r``; 0 runs all iterations.

    Returns:
        ``(J, M, N)`` plans ``diag(r) K diag(c)``.
    """
    r = torch.ones_like(row_marginal)
    c = torch.ones_like(col_marginal)
    for _ in range(max_iter):
        previous = r
        r = row_marginal / torch.bmm(kernel, c.unsqueeze(-1)).squeeze(-1)  # (J, M)
        c = col_marginal / torch.bmm(kernel.transpose(1, 2), r.unsqueeze(-1)).squeeze(-1)  # (J, N)
        if (r - previous).abs().mean().item() < tolerance:
            break
    return r.unsqueeze(-1) * kernel * c.unsqueeze(-2)  # (J, M, N)


@torch.no_grad()
def uniform_sinkhorn_plan(cost: Tensor, epsilon: float = 0.1, max_iter: int = 100, tolerance: float = 1e-2) -> Tensor:
    """Entropic OT plans between uniform marginals ``1/M`` and ``1/N``.

    Runs in float32 with autocast disabled: under fp16, ``exp(-C / 0.1)`` underflows for costs
    near 2 and the scaling divides by zero.

    Args:
        cost: ``(J, M, N)`` transport costs.
        epsilon: entropic regularization; the kernel is ``exp(-cost / epsilon)``.
        max_iter: maximum number of Sinkhorn iterations.
        tolerance: stopping threshold of :func:`sinkhorn`.

    Returns:
        ``(J, M, N)`` float32 plans whose entries sum to 1 per problem.

    Raises:
        TransportPlanError: the plan has NaN or infinite entries.
    """
    with torch.autocast(cost.device.type, enabled=False):
        cost = cost.float()
        j, m, n = cost.shape
        kernel = torch.exp(-cost / epsilon)  # (J, M, N)
        rows = cost.new_full((j, m), 1.0 / m)
        cols = cost.new_full((j, n), 1.0 / n)
        plan = sinkhorn(kernel, rows, cols, max_iter, tolerance)
    if not torch.isfinite(plan).all():
        bad = int((~torch.isfinite(plan)).flatten(1).any(dim=1).sum())
        raise TransportPlanError(
            f"the Sinkhorn transport plan has NaN or infinite entries in {bad} of {j} problems "
            f"(epsilon {epsilon}, cost range [{float(cost.nan_to_num().min()):.3g}, "
            f"{float(cost.nan_to_num().max()):.3g}]). Either the features are not finite (check the "
            "loss and lower the learning rate) or exp(-cost / epsilon) underflowed to 0: raise ot_epsilon"
        )
    return plan


def transport_scores(
    features: Tensor,
    prompt_features: Tensor,
    epsilon: float = 0.1,
    max_iter: int = 100,
    tolerance: float = 1e-2,
    plan: TransportPlan = "sinkhorn",
) -> Tensor:
    """OT similarity between each image's feature set and each class's prompt feature set.

    For image b and class k, the cosine matrix ``S`` (M, N) pairs the M image-side features with
    the N prompt features of class k. The cost is ``1 - S``, the plan ``T`` comes from
    :func:`uniform_sinkhorn_plan` without gradients, and the score is ``sum(T * S)``. With
    ``plan="uniform"``, ``T = 1 / (M N)`` and the score is the mean cosine (mean pooling, the
    ablation PLOT compares against).

    Args:
        features: ``(B, M, E)`` image-side features (need not be normalized).
        prompt_features: ``(N, K, E)`` text features of N prompt sets (need not be normalized).
        epsilon: entropic regularization of the plan.
        max_iter: maximum number of Sinkhorn iterations.
        tolerance: Sinkhorn stopping threshold.
        plan: ``sinkhorn`` or ``uniform``.

    Returns:
        ``(B, K)`` transport scores in [-1, 1].
    """
    b, m, _ = features.shape
    n, k, _ = prompt_features.shape
    features = F.normalize(features, dim=-1)
    prompt_features = F.normalize(prompt_features, dim=-1)
    similarity = torch.einsum("bme,nke->bkmn", features, prompt_features)  # (B, K, M, N)
    if plan == "uniform":
        return similarity.mean(dim=(-2, -1))  # (B, K)
    if plan != "sinkhorn":
        raise ValueError(f"plan must be one of {list(TRANSPORT_PLANS)}, got {plan!r}")
    cost = 1.0 - similarity.detach().reshape(b * k, m, n)  # (J, M, N), J = B*K
    transport = uniform_sinkhorn_plan(cost, epsilon, max_iter, tolerance).reshape(b, k, m, n)  # (B, K, M, N)
    return (transport * similarity).sum(dim=(-2, -1))  # (B, K)

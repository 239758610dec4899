"""FedProx's proximal term as an Avalanche plugin (Li et al., https://arxiv.org/abs/1812.06127)."""

from __future__ import annotations

from typing import Mapping

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor

PROXIMAL_TERM = "prox"


class ProximalTermPlugin(SupervisedPlugin):
    """Adds ``(mu / 2) * sum ||w - w_global||^2`` over the learner's global parameters to the loss.

    Flower's FedProx strategy sends ``mu`` to the clients (``proximal-mu``); the client attaches
    this plugin with the global state it received, before local training changes it. Parameters
    outside ``reference`` (local, personalized ones) are not pulled toward anything.

    Args:
        mu: Weight of the term, > 0.
        reference: The global state at the start of the round, keyed like ``state_dict``.
    """

    def __init__(self, mu: float, reference: Mapping[str, Tensor]) -> None:
        super().__init__()
        if mu <= 0:
            raise ValueError(f"the proximal weight mu must be > 0, got {mu!r}; leave the plugin out for mu = 0")
        self.mu = float(mu)
        self.reference = {k: v.detach().clone() for k, v in reference.items()}

    def before_backward(self, strategy, *args, **kwargs) -> None:
        total = None
        for name, parameter in strategy.model.named_parameters():
            if not parameter.requires_grad or name not in self.reference:
                continue
            anchor = self.reference[name].to(device=parameter.device, dtype=parameter.dtype)
            distance = torch.sum((parameter - anchor) ** 2)
            total = distance if total is None else total + distance
        if total is not None:
            strategy.add_loss_term(PROXIMAL_TERM, 0.5 * self.mu * total)

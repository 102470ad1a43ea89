"""``entropy``: exit when the prediction entropy (nats) falls to a threshold (DeeBERT)."""

from __future__ import annotations

import torch

from .base import ExitPolicy, register_policy


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits -> (B,) entropy of the softmax in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@register_policy("entropy")
class EntropyPolicy(ExitPolicy):
    param = "threshold"
    safer_when = "lower"
    param_range = (0.0, float("inf"))

    def __init__(self, threshold: float = 0.2) -> None:
        super().__init__(threshold=threshold)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        return prediction_entropy(logits) <= self.value, state

    def grid(self, num_exits: int) -> list[float]:
        # DeeBERT sweeps raw entropy; spread the grid geometrically over 1e-4 .. 1.0 nats, and
        # on to 7.9 nats: entropy reaches log C (6.9 for 1,000 classes), so a confident
        # many-class prediction can sit above 1 nat.
        return ([0.0] + [round(10 ** (-4 + 4 * i / 99), 6) for i in range(100)]
                + [round(10 ** (i / 20), 4) for i in range(1, 19)])

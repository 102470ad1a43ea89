"""``confidence``: exit when the top softmax probability reaches a threshold (BranchyNet, SDN)."""

from __future__ import annotations

import torch

from .base import ExitPolicy, register_policy


@register_policy("confidence")
class ConfidencePolicy(ExitPolicy):
    param = "threshold"
    safer_when = "higher"
    param_range = (0.0, 1.0)

    def __init__(self, threshold: float = 0.9) -> None:
        super().__init__(threshold=threshold)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        confidence = torch.softmax(logits.float(), dim=-1).amax(-1)
        return confidence >= self.value, state

    def grid(self, num_exits: int) -> list[float]:
        # Fine from 0.5 up (two classes never go below it); coarser from 0.05, where a top
        # probability of a many-class model (1/C at the least) can still mean "right".
        return ([round(0.05 + 0.025 * i, 4) for i in range(18)]
                + [round(0.5 + 0.005 * i, 4) for i in range(100)]
                + [0.9975, 0.999, 0.9999, 1.0])

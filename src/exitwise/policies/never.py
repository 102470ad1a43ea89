"""``never``: no row exits early; every row runs to the final classifier."""

from __future__ import annotations

import torch

from .base import ExitPolicy, register_policy


@register_policy("never")
class NeverPolicy(ExitPolicy):
    param = "none"
    tasks = ("classification", "regression")

    def __init__(self) -> None:
        super().__init__()

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state

    def grid(self, num_exits: int) -> list[float]:
        return [0.0]

    def with_param(self, value):
        return NeverPolicy()

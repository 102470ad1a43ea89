"""``static``: every row leaves at the same exit (index ``exit``), e.g. truncation at layer k."""

from __future__ import annotations

import numbers

import torch

from ..errors import ConfigError
from .base import ExitPolicy, register_policy


@register_policy("static")
class StaticPolicy(ExitPolicy):
    param = "exit"
    tasks = ("classification", "regression")
    safer_when = "higher"
    param_range = (0, 10_000)

    def __init__(self, exit: int = 0) -> None:
        if isinstance(exit, float) and exit.is_integer():
            exit = int(exit)
        super().__init__(exit=exit)
        if not isinstance(exit, numbers.Integral):  # 1.5 once meant exit 1
            raise ConfigError(f"static: exit must be an integer exit index; got {exit!r}")

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        hit = exit_index >= int(self.value)
        return torch.full((logits.shape[0],), hit, dtype=torch.bool, device=logits.device), state

    def grid(self, num_exits: int) -> list[float]:
        return list(range(num_exits))

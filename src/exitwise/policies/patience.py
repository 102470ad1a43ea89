"""``patience``: PABEE. Exit once the argmax has stayed the same for ``patience`` exits in a row.

Per-row state: the previous exit's prediction and the run length of unchanged predictions.
"""

from __future__ import annotations

import torch

from .base import ExitPolicy, PolicyState, register_policy


@register_policy("patience")
class PatiencePolicy(ExitPolicy):
    param = "patience"
    param_range = (1, 10_000)

    def __init__(self, patience: int = 2) -> None:
        if isinstance(patience, float) and patience.is_integer():
            patience = int(patience)
        super().__init__(patience=patience)
        if not isinstance(patience, int):
            from ..errors import ConfigError

            raise ConfigError(f"patience: patience must be an integer, got {patience!r}")

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        return {
            "previous": torch.full((batch_size,), -1, dtype=torch.long, device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        pred = logits.argmax(-1)
        same = pred == state["previous"]
        count = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= self.value, {"previous": pred, "count": count}

    def grid(self, num_exits: int) -> list[float]:
        return list(range(1, max(num_exits, 2)))

"""``patience_confidence``: PCEE-BERT. Exit once ``patience`` consecutive exits were confident.

An exit counts as confident when its top softmax probability reaches ``threshold``; the run
resets on any unconfident exit. The tuned parameter is the threshold; patience stays fixed.
"""

from __future__ import annotations

import torch

from .base import ExitPolicy, PolicyState, register_policy


@register_policy("patience_confidence")
class PatienceConfidencePolicy(ExitPolicy):
    param = "threshold"
    param_range = (0.0, 1.0)

    def __init__(self, threshold: float = 0.9, patience: int = 2) -> None:
        super().__init__(threshold=threshold, patience=patience)
        self._check_range("patience", patience, (1, 10_000))
        if int(patience) != patience:
            from ..errors import ConfigError

            raise ConfigError(f"patience_confidence: patience must be an integer, got {patience}")

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        return {"count": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        confident = torch.softmax(logits.float(), dim=-1).amax(-1) >= self.value
        count = torch.where(confident, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= int(self.params["patience"]), {"count": count}

    def grid(self, num_exits: int) -> list[float]:
        return [round(0.5 + 0.005 * i, 4) for i in range(100)] + [0.9975, 0.999, 1.0]

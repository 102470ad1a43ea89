"""``patience``: PABEE (Zhou et al. 2020, "BERT Loses Patience", Sec. 3.2). Exit once the
prediction has stayed the same for ``patience`` exits in a row.

Classification: "the same" is the same arg-max class. Regression (one output per row, as the
reference's ``num_labels == 1`` branch): the prediction counts as unchanged when it moves by
less than ``tolerance`` from the previous exit's (the reference's ``regression_threshold``).
Deviation: the reference script's ``regression_threshold`` defaults to 0, which never counts
a change as small enough, so a regression model would never exit early; here ``tolerance``
defaults to 0.1 (on STS-B's 0-5 scale, a tenth of a point) and is the user's to set.
That default is in the targets' own units; :func:`tolerance_for_targets` gives the same
tolerance relative to their spread (what ``exitwise calibrate`` uses on regression models,
so that targets in other units keep PABEE's behaviour).

Per-row state: the previous exit's prediction and the run length of unchanged predictions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState, register_policy

# 0.1 on STS-B's scale, whose training targets have a standard deviation of 1.46
TOLERANCE_PER_SD = 0.07


def tolerance_for_targets(targets: Sequence[float] | torch.Tensor) -> float:
    """The regression tolerance for targets of this spread: TOLERANCE_PER_SD x their
    (population) standard deviation; 0.1 when they do not spread (or number fewer than 2)."""
    t = torch.as_tensor(targets, dtype=torch.float64).flatten()
    t = t[torch.isfinite(t)]
    sd = float(t.std(correction=0)) if t.numel() >= 2 else 0.0
    return TOLERANCE_PER_SD * sd if sd > 0 else 0.1


@register_policy("patience")
class PatiencePolicy(ExitPolicy):
    param = "patience"
    safer_when = "higher"
    param_range = (1, 10_000)
    tasks = ("classification", "regression")

    def __init__(self, patience: int = 2, tolerance: float = 0.1) -> None:
        if isinstance(patience, float) and patience.is_integer():
            patience = int(patience)
        super().__init__(patience=patience, tolerance=tolerance)
        if not isinstance(patience, int):
            raise ConfigError(f"patience: patience must be an integer, got {patience!r}")
        self._check_range("tolerance", tolerance, (0.0, float("inf")))

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        return {
            "previous": torch.full((batch_size,), float("nan"), device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        if logits.shape[-1] == 1:  # regression: the predicted value itself
            pred = logits[:, 0].float()
            same = (pred - state["previous"]).abs() < float(self.params["tolerance"])
        else:  # class ids as floats: exact for any realistic number of classes
            pred = logits.argmax(-1).float()
            same = pred == state["previous"]
        # nan (no previous exit yet) compares unequal, as the reference's "None" does
        count = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= self.value, {"previous": pred, "count": count}

    def grid(self, num_exits: int) -> list[float]:
        return list(range(1, max(num_exits, 2)))

"""``window``: window-based early-exit cascade (Xia & Bouganis, "Window-Based Early-Exit
Cascades for Uncertainty Estimation", ICCV 2023).

A row is passed on to the next exit only when its uncertainty ``u`` at this exit lies inside
the window ``[low, high]``:

* ``u < low``: confident, exit with this prediction;
* ``u > high``: so uncertain that it will most likely be rejected (misclassified or
  out-of-distribution) whatever the deeper exits say; exit too, flagged *rejected*, instead of
  wasting the deeper blocks on it.

``u`` is normalised to [0, 1]: ``measure="entropy"`` uses the softmax entropy divided by
``log C``; ``measure="max_prob"`` uses ``1 - max softmax probability``. ``tune`` names which
edge of the window calibration sweeps (``"low"``, the default, or ``"high"``); the other one
stays fixed. With the default ``high=1.0`` nothing is ever rejected and the policy is an
entropy-threshold cascade.

Per-row state: ``uncertainty`` (B,) at the latest exit and ``rejected`` (B,) bool. The
executor drops the state of rows as they leave, so for analysis use :meth:`WindowPolicy.
uncertainty` and :meth:`WindowPolicy.rejected` on the logits at each row's exit (that is
what :func:`exitwise.analysis.protocols.window_outcome` does on a cache).
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState, register_policy

MEASURES = ("entropy", "max_prob")


def normalized_uncertainty(logits: torch.Tensor, measure: str = "entropy") -> torch.Tensor:
    """(B, C) logits -> (B,) uncertainty in [0, 1] (see the module docstring)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if measure == "entropy":
        num_classes = int(logits.shape[-1])
        if num_classes < 2:
            return torch.zeros(logits.shape[0], device=logits.device)
        entropy = -(logp.exp() * logp).sum(-1)
        return (entropy / math.log(num_classes)).clamp(0.0, 1.0)
    if measure == "max_prob":
        return 1.0 - logp.exp().amax(-1)
    raise ConfigError(f"window: measure must be one of {MEASURES}, got {measure!r}")


@register_policy("window")
class WindowPolicy(ExitPolicy):
    """Pass a row on only while ``low <= uncertainty <= high``."""

    param = "low"
    param_range = (0.0, 1.0)

    def __init__(
        self,
        low: float = 0.2,
        high: float = 1.0,
        measure: str = "entropy",
        tune: str = "low",
    ) -> None:
        if tune not in ("low", "high"):
            raise ConfigError(f"window: tune must be 'low' or 'high', got {tune!r}")
        if measure not in MEASURES:
            raise ConfigError(f"window: measure must be one of {MEASURES}, got {measure!r}")
        self.param = tune  # the edge calibration sweeps (instance-level, read by with_param)
        super().__init__(low=low, high=high, measure=measure, tune=tune)
        self._check_range("low", low, self.param_range)
        self._check_range("high", high, self.param_range)
        if float(low) > float(high):
            raise ConfigError(f"window: low={low} must not exceed high={high}")

    @property
    def low(self) -> float:
        return float(self.params["low"])

    @property
    def high(self) -> float:
        return float(self.params["high"])

    def uncertainty(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) logits -> (B,) normalised uncertainty under this policy's measure."""
        return normalized_uncertainty(logits, self.params["measure"])

    def rejected(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool: rows this policy flags as rejected (uncertainty above ``high``)."""
        return self.uncertainty(logits) > self.high

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        return {
            "uncertainty": torch.zeros(batch_size, device=device),
            "rejected": torch.zeros(batch_size, dtype=torch.bool, device=device),
        }

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        u = self.uncertainty(logits)
        rejected = u > self.high
        done = (u < self.low) | rejected
        return done, {"uncertainty": u, "rejected": rejected}

    def grid(self, num_exits: int) -> list[float]:
        fine = [1e-4, 3e-4, 1e-3, 3e-3]
        steps = [round(0.01 * i, 4) for i in range(101)]
        if self.param == "low":  # 0 .. high
            values = [v for v in sorted(set(fine + steps)) if v <= self.high]
        else:  # low .. 1
            values = [v for v in steps if v >= self.low]
        return values or [self.value]

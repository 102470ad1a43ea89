"""``window``: window-based early-exit cascade (Xia & Bouganis, "Window-Based Early-Exit
Cascades for Uncertainty Estimation: When Deep Ensembles are More Efficient than Single
Models", ICCV 2023; reference: ``window_threshold_strategy`` in the authors' cascade utilities).

The downstream task decides by thresholding an uncertainty ``u`` at an operating point ``t``
(selective classification rejects ``u > t``, OOD detection flags ``u > t``). Only samples near
``t`` can change that decision by running deeper, so a row is passed on to the next exit only
while its uncertainty lies inside a window around the operating threshold:

* ``u < t - width``: confidently accepted, exit with this prediction;
* ``u > t + width``: confidently rejected (``u > t``), exit too instead of wasting the deeper
  blocks on it;
* ``t - width <= u <= t + width``: too close to call, go on to the next exit.

A row's final accept/reject decision is ``u > t`` at the exit it leaves from
(:meth:`WindowPolicy.rejected`). ``u`` is normalised to [0, 1]: ``measure="entropy"`` is the
softmax entropy divided by ``log C``; ``measure="max_prob"`` is ``1 - max softmax
probability``. Calibration sweeps ``width`` by default (``tune``; 0 = everyone leaves at the
first exit, 1 = full depth); ``tune="threshold"`` sweeps the operating point instead.

``ensemble=True`` is the paper's cascade of ensembles: at exit k the uncertainty (and the
prediction a leaving row returns, :meth:`WindowPolicy.output_logits`) come from the average of
the softmax outputs of exits 0..k, as stage k of the paper's cascade is the deep ensemble of
members 1..k+1. Default ``False``: each exit on its own (a single multi-exit network is not a
deep ensemble of independent members; the paper's main results ensemble them).

The window may also be given by its edges, ``low`` and ``high`` (``u < low`` or ``u > high``
exits; rows above ``high`` are the rejected ones), with ``tune`` ``"low"`` or ``"high"``: the
form earlier versions of this policy used. ``low=0.2, high=1.0`` is a plain uncertainty
cascade that never rejects.

Per-row state: ``uncertainty`` (B,) and ``rejected`` (B,) bool at the latest exit; with
``ensemble`` also ``prob_sum`` (B, C), the summed softmax of the exits seen (the executor
calls ``decide`` at every exit but the last, in order, so a row's sum is its own).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from ..options import flag
from .base import ExitPolicy, PolicyState, register_policy

MEASURES = ("entropy", "max_prob")
WINDOW_TUNES = ("width", "threshold")
EDGE_TUNES = ("low", "high")


def uncertainty_of_logp(logp: torch.Tensor, measure: str = "entropy") -> torch.Tensor:
    """(B, C) log-probabilities -> (B,) uncertainty in [0, 1] under ``measure``."""
    if measure == "entropy":
        num_classes = int(logp.shape[-1])
        if num_classes < 2:
            return torch.zeros(logp.shape[0], device=logp.device)
        p = logp.exp()
        entropy = -(p * logp.clamp_min(-1e30)).nan_to_num(0.0).sum(-1)
        return (entropy / math.log(num_classes)).clamp(0.0, 1.0)
    if measure == "max_prob":
        return 1.0 - logp.exp().amax(-1)
    raise ConfigError(f"window: measure must be one of {MEASURES}, got {measure!r}")


def normalized_uncertainty(logits: torch.Tensor, measure: str = "entropy") -> torch.Tensor:
    """(B, C) logits -> (B,) uncertainty in [0, 1] (see the module docstring)."""
    return uncertainty_of_logp(torch.log_softmax(logits.float(), dim=-1), measure)


def _unit(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"window: {name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise ConfigError(f"window: {name}={value!r} is outside its range [0, 1]")
    return v


@register_policy("window")
class WindowPolicy(ExitPolicy):
    """Pass a row on only while its uncertainty lies in the window around the threshold."""

    param = "width"
    param_range = (0.0, 1.0)

    def __init__(
        self,
        threshold: float | None = None,
        width: float | None = None,
        low: float | None = None,
        high: float | None = None,
        measure: str = "entropy",
        ensemble: bool = False,
        tune: str | None = None,
    ) -> None:
        if measure not in MEASURES:
            raise ConfigError(f"window: measure must be one of {MEASURES}, got {measure!r}")
        edges = low is not None or high is not None
        if edges and (threshold is not None or width is not None):
            raise ConfigError(
                "window: give the window as threshold and width (around the operating "
                "threshold) or by its edges low and high, not both"
            )
        if edges:
            tune = "low" if tune is None else tune
            if tune not in EDGE_TUNES:
                raise ConfigError(f"window: with low/high, tune must be one of {EDGE_TUNES}")
            lo = _unit("low", 0.2 if low is None else low)
            hi = _unit("high", 1.0 if high is None else high)
            if lo > hi:
                raise ConfigError(f"window: low={lo} must not exceed high={hi}")
            params: dict[str, Any] = {"low": lo, "high": hi}
        else:
            tune = "width" if tune is None else tune
            if tune not in WINDOW_TUNES:
                raise ConfigError(f"window: tune must be one of {WINDOW_TUNES}, got {tune!r}")
            params = {"threshold": _unit("threshold", 0.5 if threshold is None else threshold),
                      "width": _unit("width", 0.1 if width is None else width)}
        self.param = tune  # the parameter calibration sweeps (instance-level, read by with_param)
        # A wider window, a lower ``low`` or a higher ``high`` pass more rows on; moving the
        # operating threshold is not monotone in that sense.
        self.safer_when = {"width": "higher", "low": "lower", "high": "higher"}.get(tune)
        super().__init__(**params, measure=measure, ensemble=flag("window", "ensemble", ensemble),
                         tune=tune)

    # -- the window ---------------------------------------------------------------------------
    @property
    def edge_form(self) -> bool:
        return "low" in self.params

    @property
    def low(self) -> float:
        """Lower edge of the window: rows below it exit (accepted)."""
        if self.edge_form:
            return float(self.params["low"])
        return max(0.0, float(self.params["threshold"]) - float(self.params["width"]))

    @property
    def high(self) -> float:
        """Upper edge of the window: rows above it exit (rejected)."""
        if self.edge_form:
            return float(self.params["high"])
        return min(1.0, float(self.params["threshold"]) + float(self.params["width"]))

    @property
    def threshold(self) -> float:
        """The operating threshold a row's final uncertainty is compared with (``high`` when
        the window was given by its edges)."""
        return float(self.params["threshold"]) if not self.edge_form else self.high

    def uncertainty(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) logits (or an ensemble's log-probabilities) -> (B,) uncertainty."""
        return normalized_uncertainty(logits, self.params["measure"])

    def rejected(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool: rows whose uncertainty at this output is above the operating threshold.
        Give it what the row returned (:meth:`output_logits` when ``ensemble``)."""
        return self.uncertainty(logits) > self.threshold

    # -- the ensemble of the exits seen -------------------------------------------------------
    @property
    def transforms_output(self) -> bool:
        return bool(self.params["ensemble"])

    def _ensemble_logp(
        self, exit_index: int, logits: torch.Tensor, state: PolicyState
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log of the mean softmax of exits 0..k (B, C), the new probability sum (B, C))."""
        p = torch.softmax(logits.float(), dim=-1)
        seen = state.get("prob_sum")
        total = p if seen is None or seen.shape[1] == 0 else seen + p
        return torch.log(total / float(exit_index + 1)), total

    def output_logits(
        self, exit_index: int, num_exits: int, logits: torch.Tensor, state: PolicyState
    ) -> torch.Tensor:
        """(B, C): with ``ensemble``, the log of the mean softmax of exits 0..k (state from
        before this exit's ``decide``); otherwise the exit's own logits."""
        if not self.params["ensemble"]:
            return logits
        return self._ensemble_logp(exit_index, logits, state)[0]

    # -- the contract -------------------------------------------------------------------------
    def init_state(self, batch_size, device="cpu") -> PolicyState:
        state = {
            "uncertainty": torch.zeros(batch_size, device=device),
            "rejected": torch.zeros(batch_size, dtype=torch.bool, device=device),
        }
        if self.params["ensemble"]:  # the class count is known at the first exit
            state["prob_sum"] = torch.zeros(batch_size, 0, device=device)
        return state

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        new: PolicyState = {}
        if self.params["ensemble"]:
            logp, new["prob_sum"] = self._ensemble_logp(exit_index, logits, state)
            u = uncertainty_of_logp(logp, self.params["measure"])
        else:
            u = self.uncertainty(logits)
        inside = (u >= self.low) & (u <= self.high)
        new["uncertainty"], new["rejected"] = u, u > self.threshold
        return ~inside, new

    def grid(self, num_exits: int) -> list[float]:
        fine = [1e-4, 3e-4, 1e-3, 3e-3]
        steps = [round(0.01 * i, 4) for i in range(101)]
        if self.param == "width":
            return sorted(set([0.0] + fine + steps))
        if self.param == "threshold":
            return steps
        if self.param == "low":  # 0 .. high
            values = [v for v in sorted(set(fine + steps)) if v <= self.high]
        else:  # low .. 1
            values = [v for v in steps if v >= self.low]
        return values or [self.value]

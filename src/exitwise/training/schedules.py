"""Per-exit loss weights for strategies that sum the exits' losses.

Every schedule is normalised to sum to 1, so the total loss stays on the scale of one
cross-entropy whatever the number of exits:

- ``uniform``: w_k = 1 / K.
- ``depth`` (PABEE): w_k = d_k / sum_j d_j, where d_k is the depth (1-based block count) of
  exit k, i.e. the loss is the depth-weighted average ``sum_k d_k L_k / sum_k d_k``.
- a list of K non-negative numbers: used as given, divided by its sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

from ..errors import ConfigError

WeightSpec = Union[str, Sequence[float]]
SCHEDULES = ("uniform", "depth")


def exit_weights(spec: WeightSpec, exit_layers: Sequence[int]) -> list[float]:
    """Normalised weights (one per exit, shallowest first) for ``spec``."""
    k = len(exit_layers)
    if k == 0:
        raise ConfigError("the model has no exits")
    if isinstance(spec, str):
        if spec == "uniform":
            raw = [1.0] * k
        elif spec == "depth":
            raw = [float(d) for d in exit_layers]
        else:
            raise ConfigError(
                f"unknown exit weight schedule {spec!r}; use one of {', '.join(SCHEDULES)} "
                "or a list of one weight per exit"
            )
    else:
        try:
            raw = [float(w) for w in spec]
        except (TypeError, ValueError):
            raise ConfigError(f"exit weights must be numbers, got {spec!r}") from None
        if len(raw) != k:
            raise ConfigError(f"{len(raw)} exit weights given for a model with {k} exits")
        if any(not math.isfinite(w) or w < 0 for w in raw):
            raise ConfigError(f"exit weights must be finite and >= 0, got {raw}")
    total = sum(raw)
    if total <= 0:
        raise ConfigError("exit weights sum to 0: at least one exit must have a positive weight")
    return [w / total for w in raw]

"""Per-exit softmax temperatures as plain floats: one helper below every user (the model,
policies, replay, calibration)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import InputError


def temperature_list(
    temperatures: torch.Tensor | Sequence[float] | None, num_exits: int
) -> list[float]:
    """Temperatures as Python floats, rounded through float32 like the model's buffer.

    ``None`` means no scaling (all 1). Raises :class:`InputError` on a wrong length or a
    non-positive / non-finite value.
    """
    if temperatures is None:
        return [1.0] * num_exits
    temps = torch.as_tensor(temperatures, dtype=torch.float32).detach().cpu().reshape(-1)
    if temps.numel() != num_exits:
        raise InputError(f"{temps.numel()} temperatures for {num_exits} exits")
    if not bool(torch.isfinite(temps).all() and (temps > 0).all()):
        raise InputError(f"temperatures must be finite and > 0; got {temps.tolist()}")
    # float(float32) exactly as MultiExitModel.temperature_list does.
    return [float(t) for t in temps]


def same_temperatures(a: Sequence[float], b: Sequence[float],
                      dtype: torch.dtype = torch.float32) -> bool:
    """Whether two temperature lists are one, up to rounding through ``dtype`` (a model cast
    to bfloat16 holds its temperatures rounded so) and float round-off."""
    if len(a) != len(b):
        return False
    if dtype != torch.float32:  # both as the model's buffer holds them
        a, b = (torch.tensor([float(t) for t in x], dtype=dtype).tolist() for x in (a, b))
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))

"""Exit placement by compute: put exits where the cumulative FLOPs reach given fractions.

Shallow-Deep Networks (Kaya et al., 2019) place their internal classifiers after the blocks at
which 15%, 30%, 45%, 60%, 75% and 90% of the network's FLOPs have been spent, instead of after
every k-th block: in a CNN the blocks' costs differ a lot from stage to stage.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..modes import eval_mode
from . import wrap_backbone
from .base import Backbone

SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """The fractions as floats; ConfigError unless each is a number in (0, 1]."""
    values = list(fractions)
    if not values:
        raise ConfigError("give at least one FLOPs fraction in (0, 1]")
    out = []
    for f in values:
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise ConfigError(f"FLOPs fractions must be numbers in (0, 1]; got {f!r}")
        if not 0.0 < float(f) <= 1.0:
            raise ConfigError(
                f"FLOPs fraction {f} is outside (0, 1]: a fraction of the whole network's "
                "FLOPs, e.g. 0.15 for the block where 15% of the compute has been spent"
            )
        out.append(float(f))
    return out


def parse_flops_spec(spec: str) -> list[float]:
    """``"flops:0.15,0.3"`` -> [0.15, 0.3] (validated)."""
    body = spec.split(":", 1)[1]
    try:
        values = [float(part) for part in body.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"bad layers spec {spec!r}; use 'flops:F1,F2,...' with fractions in (0, 1]"
        ) from None
    return check_fractions(values)


def cumulative_flops(backbone: Backbone, example: Any = None) -> torch.Tensor:
    """(num_layers + 1,) float64: FLOPs spent after the stem (index 0) and after each block,
    for one row of ``example`` (mean over its rows).

    example: a tensor (given as ``pixel_values``) or a dict of backbone inputs; default: the backbone's
        own ``example_input()`` when it has one (vision adapters do).
    """
    if example is None:
        maker = getattr(backbone, "example_input", None)
        if maker is None:
            raise ConfigError(
                f"{type(backbone).__name__} cannot make an example input by itself: pass "
                "example=<one input batch> to place exits by FLOPs"
            )
        example = maker()
    # eval mode: a BatchNorm in train mode would fold the blank example into its running
    # statistics, changing the user's model by merely placing exits
    with torch.no_grad(), eval_mode(backbone):
        if isinstance(example, dict):
            state = backbone.start(**example)
        else:
            state = backbone.start(pixel_values=example)
        costs = [backbone.start_flops(state).double().mean()]
        for i in range(backbone.num_layers):
            costs.append(backbone.layer_flops(i, state).double().mean())
    return torch.stack(costs).cpu().cumsum(0)


def layers_at_flops_fractions(
    backbone: Backbone | nn.Module,
    fractions: Sequence[float] = SDN_FRACTIONS,
    example: Any = None,
) -> list[int]:
    """Block depths (1-based, sorted, unique) at which the cumulative FLOPs (stem included)
    first reach each fraction of the whole network's FLOPs.

    Two fractions that land on the same block give one depth. Fractions outside (0, 1] raise
    ConfigError. ``backbone`` may be a raw model; it is wrapped with ``wrap_backbone``.
    """
    values = check_fractions(fractions)
    if not isinstance(backbone, Backbone):
        backbone = wrap_backbone(backbone)
    cum = cumulative_flops(backbone, example)
    total = float(cum[-1])
    if total <= 0:
        raise ConfigError(f"{type(backbone).__name__} reports no FLOPs; cannot place by compute")
    depths = set()
    for f in values:
        # a hair of slack so that f = 1 (or a fraction hit exactly) survives float round-off
        reached = (cum[1:] >= f * total * (1 - 1e-12)).nonzero()
        depths.add(int(reached[0]) + 1)
    return sorted(depths)

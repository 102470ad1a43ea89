"""``e2cm``: E2CM's exit rule (Görmez & Koyuncu, arXiv 2103.01148, sec. III; IJCNN 2022).

At exit k a row leaves when the top softmax probability of its exit logits is *strictly above*
that exit's own threshold ``t_k`` (the reference's ``np.max(softmax(-d)) > thresholds[i]``).
On a ``class_means`` head the logits are the negated normalised distances to the class means,
so this is E2CM's confidence; the rule reads any logits.

The thresholds are not one shared number: the reference draws random threshold vectors
(``np.random.uniform(0, 1, E-1)``, 100 of them) on training data and keeps the vectors on the
convex hull of (FLOPs, accuracy) as its operating points.
:func:`exitwise.calibration.e2cm.fit_e2cm_policy` does that on a held-out exit-logits cache and
puts the frontier into this policy as a table:

* ``costs``: the operating points' mean compute on the fitting data, as fractions of the
  full-depth model's, strictly increasing;
* ``thresholds``: one list of E-1 thresholds per operating point;
* ``cost`` (the tuned parameter): the operating point in use, the fitted one with the largest
  cost not above it (a cost below every fitted one is an error). ``grid`` is the fitted costs,
  so the searches of :mod:`exitwise.calibration.thresholds` choose among the operating points.

Unfitted (no table) only the full cost can be honoured: every row runs to the last exit.
With one threshold for every exit the rule is the ``confidence`` policy (which exits at
equality too); E2CM's own rule is this per-exit, strict one.

Reference: ``alperengormez/class_means``, ``class_means.py`` (thresholding experiments and
convex hull) and ``models.py`` ``ResNet.e2cm`` (``torch.max(softmaxvals) > thresholds[l]``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ..errors import ConfigError
from .base import ExitPolicy, register_policy


@register_policy("e2cm")
class E2CMPolicy(ExitPolicy):
    """Per-exit thresholds on the top softmax probability (strictly above), chosen by cost."""

    param = "cost"
    # Not declared: the operating points are unrelated random threshold vectors, so a dearer
    # point may still let some row leave earlier than a cheaper one does.
    safer_when = None
    fitted_by = "exitwise.calibration.e2cm.fit_e2cm_policy"
    param_range = (0.0, math.inf)

    def __init__(
        self,
        cost: float = 1.0,
        costs: list[float] | None = None,
        thresholds: list[list[float]] | None = None,
    ) -> None:
        if (costs is None) != (thresholds is None):
            raise ConfigError("e2cm: give both costs and thresholds (a fitted table) or neither")
        if costs is not None:
            costs, thresholds = self._check_table(costs, thresholds)
        super().__init__(cost=cost, costs=costs, thresholds=thresholds)
        if not float(cost) > 0:
            raise ConfigError(f"e2cm: cost must be > 0, got {cost!r}")
        self._row = self._select(float(cost))

    @staticmethod
    def _check_table(costs: Any, thresholds: Any) -> tuple[list[float], list[list[float]]]:
        if not isinstance(costs, (list, tuple)) or not costs:
            raise ConfigError("e2cm: costs must be a non-empty list of compute fractions")
        if not isinstance(thresholds, (list, tuple)) or len(thresholds) != len(costs):
            raise ConfigError(f"e2cm: need one threshold list per cost ({len(costs)})")
        values = [float(c) for c in costs]
        if any(not math.isfinite(c) or c <= 0 for c in values):
            raise ConfigError(f"e2cm: costs must be finite and > 0, got {costs!r}")
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise ConfigError(f"e2cm: costs must be strictly increasing, got {costs!r}")
        rows: list[list[float]] = []
        for row in thresholds:
            if not isinstance(row, (list, tuple)):
                raise ConfigError(f"e2cm: each thresholds entry must be a list, got {row!r}")
            if any(isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(float(t))
                   for t in row):
                raise ConfigError(f"e2cm: thresholds must be numbers, got {row!r}")
            rows.append([float(t) for t in row])
        if len({len(r) for r in rows}) != 1:
            raise ConfigError("e2cm: every threshold list must have the same length (E-1)")
        return values, rows

    def _select(self, cost: float) -> list[float] | None:
        """The thresholds in use for ``cost`` (None: unfitted, nobody leaves early)."""
        costs = self.params["costs"]
        if costs is None:
            if cost < 1.0:
                raise ConfigError(
                    f"e2cm: cost={cost} needs thresholds fitted on held-out data; use "
                    "exitwise.calibration.e2cm.fit_e2cm_policy(cache)"
                )
            return None
        fits = [i for i, c in enumerate(costs) if c <= cost * (1 + 1e-12)]
        if not fits:
            raise ConfigError(f"e2cm: cost={cost} is below every fitted operating point "
                              f"({costs[0]:.4g} is the cheapest)")
        return list(self.params["thresholds"][fits[-1]])

    @property
    def fitted(self) -> bool:
        return self.params["costs"] is not None

    @property
    def active_thresholds(self) -> list[float] | None:
        """The E-1 thresholds in use; None when unfitted."""
        return None if self._row is None else list(self._row)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        if self._row is None:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state
        if len(self._row) != num_exits - 1:
            raise ConfigError(f"e2cm: thresholds were fitted for {len(self._row) + 1} exits, "
                              f"the model has {num_exits}")
        if exit_index >= num_exits - 1:  # the last exit takes every row (the executor's rule)
            return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device), state
        confidence = torch.softmax(logits.float(), dim=-1).amax(-1)
        return confidence > self._row[exit_index], state

    def grid(self, num_exits: int) -> list[float]:
        costs = self.params["costs"]
        return [1.0] if costs is None else list(costs)

"""``budget``: MSDNet's budgeted-batch classification (Huang et al., ICLR 2018).

Per-exit thresholds ``t_k`` on the top softmax probability: a row leaves at exit k when
``max p_k >= t_k``. The thresholds are not hand-picked: for a target average budget they are
set on held-out cached logits so that the fraction of rows leaving at exit k follows a
geometric law ``∝ q^k`` whose expected cost equals the budget
(:func:`exitwise.calibration.budget.fit_budget_policy` does it).

One policy object carries the thresholds for several budgets (a fitted *table*):

* ``budgets``: the fitted budgets, as fractions of the full-depth model's mean FLOPs, ascending;
* ``thresholds``: one list of E-1 thresholds per budget (exit k's threshold at index k; the
  last exit takes every remaining row). ``None`` in a list means no row leaves at that exit.
* ``budget`` (the tuned parameter): which row of the table applies. A budget between two
  fitted ones uses the largest fitted budget below it, so the policy never plans to spend more
  than asked; one below every fitted budget is an error. ``grid`` is the fitted budgets, so the
  calibration searches of :mod:`exitwise.calibration.thresholds` pick among them directly.

Unfitted (no table), the only budget the policy can honour without data is the full one: it
runs every row to the last exit, and any ``budget < 1`` raises :class:`ConfigError`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from .base import ExitPolicy, register_policy

NEVER = math.inf  # a threshold no probability reaches


@register_policy("budget")
class BudgetPolicy(ExitPolicy):
    """Per-exit max-probability thresholds chosen for an average budget."""

    param = "budget"
    safer_when = "higher"
    fitted_by = "exitwise.calibration.budget.fit_budget_policy"
    param_range = (0.0, math.inf)

    def __init__(
        self,
        budget: float = 1.0,
        budgets: list[float] | None = None,
        thresholds: list[list[float | None]] | None = None,
    ) -> None:
        if (budgets is None) != (thresholds is None):
            raise ConfigError("budget: give both budgets and thresholds (a fitted table) or "
                              "neither")
        if budgets is not None:
            budgets, thresholds = self._check_table(budgets, thresholds)
        super().__init__(budget=budget, budgets=budgets, thresholds=thresholds)
        if float(budget) <= 0:
            raise ConfigError(f"budget: budget must be > 0, got {budget!r}")
        self._row = self._select(float(budget))

    @staticmethod
    def _check_table(budgets: Any, thresholds: Any) -> tuple[list[float], list[list[Any]]]:
        if not isinstance(budgets, (list, tuple)) or not budgets:
            raise ConfigError("budget: budgets must be a non-empty list of fractions")
        if not isinstance(thresholds, (list, tuple)) or len(thresholds) != len(budgets):
            raise ConfigError(f"budget: need one threshold list per budget ({len(budgets)})")
        values = [float(b) for b in budgets]
        if any(not math.isfinite(b) or b <= 0 for b in values):
            raise ConfigError(f"budget: budgets must be finite and > 0, got {budgets!r}")
        if any(b >= a for a, b in zip(values[1:], values[:-1])):
            raise ConfigError(f"budget: budgets must be strictly increasing, got {budgets!r}")
        rows: list[list[Any]] = []
        for row in thresholds:
            if not isinstance(row, (list, tuple)):
                raise ConfigError(f"budget: each thresholds entry must be a list, got {row!r}")
            clean = []
            for t in row:
                if t is not None and (not isinstance(t, (int, float)) or math.isnan(float(t))):
                    raise ConfigError(f"budget: threshold {t!r} is not a number or None")
                clean.append(None if t is None or math.isinf(float(t)) else float(t))
            rows.append(clean)
        if len({len(r) for r in rows}) != 1:
            raise ConfigError("budget: every threshold list must have the same length (E-1)")
        return values, rows

    def _select(self, budget: float) -> list[float] | None:
        """The thresholds for ``budget`` (None: unfitted, never exit early)."""
        budgets = self.params["budgets"]
        if budgets is None:
            if budget < 1.0:
                raise ConfigError(
                    f"budget: budget={budget} needs thresholds fitted on held-out data; use "
                    "exitwise.calibration.budget.fit_budget_policy(cache, budgets=[...])"
                )
            return None
        fits = [i for i, b in enumerate(budgets) if b <= budget * (1 + 1e-12)]
        if not fits:
            raise ConfigError(
                f"budget: budget={budget} is below every fitted budget ({budgets[0]:.4g} is the "
                "smallest); fit the policy for it"
            )
        row = self.params["thresholds"][fits[-1]]
        return [NEVER if t is None else t for t in row]

    @property
    def fitted(self) -> bool:
        return self.params["budgets"] is not None

    @property
    def active_thresholds(self) -> list[float] | None:
        """The E-1 thresholds in use (``inf`` = nobody leaves there); None when unfitted."""
        return None if self._row is None else list(self._row)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        if self._row is None:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state
        if len(self._row) != num_exits - 1:
            raise ConfigError(f"budget: thresholds were fitted for {len(self._row) + 1} exits, "
                              f"the model has {num_exits}")
        confidence = torch.softmax(logits.float(), dim=-1).amax(-1)
        return confidence >= self._row[exit_index], state

    def grid(self, num_exits: int) -> list[float]:
        budgets = self.params["budgets"]
        return [1.0] if budgets is None else list(budgets)

"""MSDNet's budgeted-batch thresholds, fitted on a held-out exit-logits cache.

For a target average budget B (a fraction of the full-depth model's mean FLOPs) and per-exit
relative costs c_0 < ... < c_{E-1}:

1. the fraction of rows leaving at exit k is set to a geometric law
   ``π_k(q) = q^k / Σ_j q^j``; the expected cost ``Σ_k π_k(q) c_k`` rises monotonically with q
   (from c_0 as q -> 0 to c_{E-1} as q -> inf), so the q whose expected cost is B is found by
   bisection (MSDNet's code sweeps q over a fixed ladder and reports whatever cost each q
   gives; solving for q gives a curve at the budgets you ask for);
2. walking the exits in order, exit k's threshold is the top-probability of the
   ``floor(N π_k)``-th most confident row among those that have not left yet (as in MSDNet's
   ``dynamic_evaluate``), so that on the held-out rows exactly that many leave (more on ties).

The thresholds go into a :class:`~exitwise.policies.budget.BudgetPolicy`. On the held-out rows
the mean cost is the budget up to rounding; on new data it follows the data's confidences.
Fit on held-out data, never on the split you report.

Deviation: the law's expected cost uses one cost per exit, which is every row's cost when all
rows cost the same (images of one size: MSDNet's setting). When rows cost differently (texts
of several lengths, the cache's own costs) the rows that leave early need not be average ones
(confident rows are often the short ones), and the law's q can overrun the budget on the very
rows it was fitted on. Then q is solved by bisection on the thresholds' realized mean cost
over the held-out rows instead (the walk in 2. unchanged); with equal costs both give the same
thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..analysis.cache import ExitLogitsCache
from ..analysis.replay import replay
from ..errors import ConfigError, InputError
from ..policies.budget import BudgetPolicy
from ..temperatures import temperature_list


def geometric_fractions(q: float, num_exits: int) -> torch.Tensor:
    """(E,) float64 exit fractions ``∝ q^k``; q = inf puts everything on the last exit."""
    if q <= 0 or math.isnan(q):
        raise ConfigError(f"q must be > 0, got {q}")
    if math.isinf(q):
        out = torch.zeros(num_exits, dtype=torch.float64)
        out[-1] = 1.0
        return out
    k = torch.arange(num_exits, dtype=torch.float64)
    return torch.softmax(k * math.log(q), dim=0)


def expected_cost(q: float, costs: torch.Tensor) -> float:
    """Mean relative cost when exits follow :func:`geometric_fractions` (q)."""
    return float((geometric_fractions(q, costs.numel()) * costs).sum())


def solve_q(budget: float, costs: Sequence[float] | torch.Tensor) -> float:
    """The q whose geometric exit law costs ``budget`` on average.

    costs: (E,) relative cost of leaving at each exit, strictly increasing. Returns ``inf``
    when the budget covers the last exit; raises :class:`ConfigError` below the first.
    """
    c = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)
    if c.numel() < 2:
        raise ConfigError("budgeted batch needs at least two exits")
    if not bool((c.diff() > 0).all()):
        raise ConfigError(f"exit costs must increase with depth, got {c.tolist()}")
    if budget < float(c[0]) * (1 - 1e-12):
        raise ConfigError(
            f"budget {budget:.4g} is below the cheapest exit's cost {float(c[0]):.4g}"
        )
    if budget >= float(c[-1]):
        return math.inf
    lo, hi = -60.0, 60.0  # log q; expected cost is monotone in it
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if expected_cost(math.exp(mid), c) < budget:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def top_probabilities(
    cache: ExitLogitsCache, temperatures: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """(N, E) float32 top softmax probability of every exit, computed exactly as the policy
    does at run time (same temperature division, same float32 softmax); -inf where a row
    skipped the exit's block (a skip gate): it is never offered that exit, so no threshold
    may count it as leaving there."""
    temps = temperature_list(temperatures, cache.num_exits)
    cols = []
    for k, t in enumerate(temps):
        logits = cache.logits[:, k]
        if t != 1.0:
            logits = logits / t
        cols.append(torch.softmax(logits.float(), dim=-1).amax(-1))
    top = torch.stack(cols, dim=1)
    if cache.skipped is not None:
        top = top.masked_fill(cache.skipped.to(torch.bool), float("-inf"))
    return top


def thresholds_for_fractions(top: torch.Tensor, fractions: torch.Tensor) -> list[float | None]:
    """MSDNet's threshold walk: E-1 thresholds (None = nobody leaves) from (N, E) top
    probabilities and (E,) target exit fractions."""
    n, num_exits = top.shape
    left = torch.zeros(n, dtype=torch.bool)
    out: list[float | None] = []
    for k in range(num_exits - 1):
        want = int(math.floor(n * float(fractions[k]) + 1e-9))
        remaining = top[~left, k]
        remaining = remaining[remaining > float("-inf")]  # rows offered this exit at all
        if want <= 0 or remaining.numel() == 0:
            out.append(None)
            continue
        ordered = remaining.sort(descending=True).values
        t = float(ordered[min(want, ordered.numel()) - 1])
        out.append(t)
        left |= top[:, k] >= t
    return out


def realized_cost(top: torch.Tensor, thresholds: Sequence[float | None],
                  costs: torch.Tensor) -> float:
    """Mean cost over the rows of (N, E) ``costs`` when each row leaves at the first exit
    whose threshold its top probability reaches (the last exit otherwise), as
    :func:`thresholds_for_fractions` counts them."""
    n, num_exits = top.shape
    at = torch.full((n,), num_exits - 1, dtype=torch.long)
    left = torch.zeros(n, dtype=torch.bool)
    for k, t in enumerate(thresholds):
        if t is None:
            continue
        now = ~left & (top[:, k] >= t)
        at[now] = k
        left |= now
    return float(costs.gather(1, at[:, None]).mean())


def _solve_q_realized(budget: float, top: torch.Tensor, row_costs: torch.Tensor) -> float:
    """The largest q (bisection on log q) whose thresholds' realized mean cost on the rows is
    at most ``budget``; row_costs: (N, E) relative to the mean full-depth cost."""
    num_exits = top.shape[1]

    def cost(log_q: float) -> float:
        return realized_cost(
            top, thresholds_for_fractions(top, geometric_fractions(math.exp(log_q), num_exits)),
            row_costs)

    lo, hi = -60.0, 60.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


@dataclass
class BudgetFit:
    """Thresholds fitted for several budgets, and how they did on the held-out cache.

    policy: a BudgetPolicy holding the whole table (its ``budget`` set to the largest).
    points: one dict per budget: budget, q, target_fractions (E,), thresholds (E-1),
            heldout {accuracy, relative_compute, exit_fractions, ...}.
    costs:  (E,) relative exit costs (mean cost at each exit / mean full-depth cost): what
            the law's q's were solved with; with rows of several costs the q's were solved on
            the rows' own (module doc).
    """

    policy: BudgetPolicy
    points: list[dict[str, Any]] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "points": self.points, "costs": self.costs}


def fit_budget_policy(
    cache: ExitLogitsCache,
    budgets: Sequence[float],
    costs: Sequence[float] | torch.Tensor | None = None,
    temperatures: torch.Tensor | Sequence[float] | None = None,
) -> BudgetFit:
    """Fit MSDNet budgeted-batch thresholds on a held-out cache.

    budgets: target mean costs as fractions of the full-depth model's mean FLOPs (each at least
        the first exit's relative cost; duplicates are merged).
    costs: (E,) relative cost of leaving at each exit; default: the cache's own
        (mean cost at exit k / mean full-depth cost).
    temperatures: the model's per-exit temperatures (the policy sees scaled logits).
    """
    cache.check(need_labels=True)
    if cache.num_exits < 2:
        raise InputError("budgeted batch needs a model with at least two exits")
    if costs is None:
        c = cache.costs.mean(0) / cache.full_cost.mean()
    else:
        c = torch.as_tensor(costs, dtype=torch.float64).reshape(-1)
        if c.numel() != cache.num_exits:
            raise InputError(f"{c.numel()} exit costs for {cache.num_exits} exits")
    wanted = sorted({float(b) for b in budgets})
    if not wanted:
        raise ConfigError("give at least one budget")
    top = top_probabilities(cache, temperatures)
    table_budgets: list[float] = []
    table: list[list[float | None]] = []
    points: list[dict[str, Any]] = []
    # rows that cost differently: the law's expected cost is not the rows' (module doc)
    row_costs = cache.costs / cache.full_cost.mean()
    per_row = costs is None and bool((row_costs != row_costs[:1]).any())
    for b in wanted:
        q = solve_q(b, c)
        if per_row and math.isfinite(q):
            q = _solve_q_realized(b, top, row_costs)
        fractions = geometric_fractions(q, cache.num_exits)
        thresholds = thresholds_for_fractions(top, fractions)
        table_budgets.append(b)
        table.append(thresholds)
        points.append({"budget": b, "q": q if math.isfinite(q) else None,
                       "target_fractions": fractions.tolist(), "thresholds": thresholds})
    policy = BudgetPolicy(budget=table_budgets[-1], budgets=table_budgets, thresholds=table)
    for point in points:
        res = replay(policy.with_param(point["budget"]), cache, temperatures)
        metrics = res.metrics()
        metrics["exit_fractions"] = [v / cache.num_examples for v in metrics["exit_histogram"]]
        point["heldout"] = metrics
    return BudgetFit(policy=policy, points=points, costs=c.tolist())

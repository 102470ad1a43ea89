"""Thresholds with a guarantee: the most aggressive setting whose *upper confidence bound* on
the accuracy drop (or on the disagreement with the final exit) stays within the target.

A threshold chosen on a held-out slice by its observed drop lands above the target on new data
about half the time, since the observed drop is itself a noisy estimate. Here each candidate is
accepted only when its drop is certified: with probability at least ``1 - delta`` over the draw
of the held-out rows (assumed exchangeable with the test rows), the true drop of *every*
accepted setting is at most the target (Learn-then-Test, Angelopoulos et al. 2021, with
fixed-sequence testing as in CALM, Schuster et al. 2022, Sec. 4).

Per held-out row i and candidate setting:

- ``drop``: a_i = 1[final exit right, chosen exit wrong], b_i = 1[final wrong, chosen right];
  the drop is E[a] - E[b]. Its upper bound is the exact (Clopper-Pearson) upper bound of E[a]
  at level delta/2 minus the exact lower bound of E[b] at level delta/2 (a union bound), so the
  overthinking cases the early exit gets right are credited, not ignored;
- ``disagreement``: d_i = 1[chosen exit's prediction differs from the final exit's]; its exact
  upper bound at level delta bounds the drop too, with no labels needed.

Order: candidates are tested from the safest towards the most aggressive, each at level delta,
and testing stops at the first one not certified (fixed-sequence testing controls the
family-wise error at delta). The order must not depend on the held-out losses: it comes from
the policy's declared direction (``ExitPolicy.safer_when``); for a policy that declares none,
every candidate is tested at delta / (number of candidates) instead (Bonferroni).

Regression models have no per-row 0/1 loss for Pearson's r; they are refused here (use the
plain search, ``delta=None``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..analysis.replay import ReplayResult, replay
from ..analysis.scores import REGRESSION, predictions_of
from ..errors import ConfigError
from .ltt import CalibrationRefused, binomial_cdf

if TYPE_CHECKING:  # pragma: no cover
    from ..analysis.cache import ExitLogitsCache
    from ..policies.base import ExitPolicy

RISKS = ("drop", "disagreement")


def binomial_upper(k: int, n: int, alpha: float) -> float:
    """Exact one-sided upper confidence bound at level ``alpha`` for a rate observed as k of
    n (Clopper-Pearson): the p with P[Binomial(n, p) <= k] = alpha (1 when k = n)."""
    if not 0 <= k <= n or n < 1:
        raise ConfigError(f"need 0 <= k <= n and n >= 1; got k={k}, n={n}")
    if k == n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(100):  # bisection: the CDF falls as p grows
        mid = (lo + hi) / 2
        if binomial_cdf(k, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def binomial_lower(k: int, n: int, alpha: float) -> float:
    """Exact one-sided lower confidence bound at level ``alpha`` (0 when k = 0)."""
    if not 0 <= k <= n or n < 1:
        raise ConfigError(f"need 0 <= k <= n and n >= 1; got k={k}, n={n}")
    if k == 0:
        return 0.0
    return 1.0 - binomial_upper(n - k, n, alpha)


def drop_bound(exit_right: torch.Tensor, final_right: torch.Tensor, delta: float
               ) -> tuple[float, float]:
    """(certified upper bound, observed value) of the accuracy drop; (N,) bool inputs."""
    n = int(exit_right.numel())
    a = int((final_right & ~exit_right).sum())
    b = int((~final_right & exit_right).sum())
    bound = binomial_upper(a, n, delta / 2) - binomial_lower(b, n, delta / 2)
    return bound, (a - b) / n


def disagreement_bound(exit_pred: torch.Tensor, final_pred: torch.Tensor, delta: float
                       ) -> tuple[float, float]:
    """(certified upper bound, observed value) of the share of rows whose prediction differs
    from the final exit's; (N,) inputs."""
    n = int(exit_pred.numel())
    d = int((exit_pred != final_pred).sum())
    return binomial_upper(d, n, delta), d / n


def minimum_rows(target: float, delta: float, risk: str = "drop") -> int:
    """Held-out rows needed before even a setting with no observed loss can be certified."""
    alpha = delta / 2 if risk == "drop" else delta
    # zero events: upper bound = 1 - alpha^(1/n) <= target  <=>  n >= log(alpha) / log(1-target)
    return math.ceil(math.log(alpha) / math.log1p(-target))


def certify_candidates(
    policy: "ExitPolicy",
    cache: "ExitLogitsCache",
    temps: list[float],
    target: float,
    delta: float,
    risk: str = "drop",
) -> tuple[list[tuple["ExitPolicy", ReplayResult, float, float]], str]:
    """Replay every grid setting and certify in order; returns ([(policy, replay, bound,
    observed), ...] for the certified settings, safest first) and how they were tested
    ("fixed-sequence" or "bonferroni"). Raises CalibrationRefused when the cache is too small
    for any setting to be certified."""
    if risk not in RISKS:
        raise ConfigError(f"risk must be one of {', '.join(RISKS)}; got {risk!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ConfigError(f"delta must be in (0, 1); got {delta!r}")
    if not 0.0 < float(target) < 1.0:
        raise ConfigError(f"a certified target must be in (0, 1) (a fraction); got {target!r}")
    if cache.task == REGRESSION:
        raise ConfigError(
            "a certified threshold needs a per-row 0/1 loss; Pearson's r of a regression "
            "model is not one: calibrate regression models without delta (delta=None)"
        )
    values = list(policy.grid(cache.num_exits))
    direction = getattr(policy, "safer_when", None)
    if direction in ("higher", "lower"):
        values.sort(reverse=direction == "higher")  # safest first
        method, level = "fixed-sequence", float(delta)
    else:
        method, level = "bonferroni", float(delta) / max(len(values), 1)
    n = cache.num_examples
    need = minimum_rows(target, level, risk)  # at the level each setting is tested at
    if n < need:
        alpha = level / 2 if risk == "drop" else level
        raise CalibrationRefused(
            f"{n} held-out rows are too few to certify a drop of {100 * target:.2f} points at "
            f"delta={delta} ({method}): even a setting that never differs from full depth "
            f"gets a bound of {100 * (1 - alpha ** (1 / n)):.2f} points. Hold out at least "
            f"{need} rows (on the command line: exitwise train --holdout {need}, which trains "
            "anew), relax the target or delta, or use delta=None (--delta none on the "
            "command line; no guarantee)"
        )
    final_pred = predictions_of(cache.logits[:, -1])
    final_right = final_pred == cache.labels
    certified = []
    for value in values:
        candidate = policy.with_param(value)
        res = replay(candidate, cache, temps)
        if risk == "drop":
            bound, seen = drop_bound(res.predictions == cache.labels, final_right, level)
        else:
            bound, seen = disagreement_bound(res.predictions, final_pred, level)
        if bound <= target:
            certified.append((candidate, res, bound, seen))
        elif method == "fixed-sequence":
            break  # the first failure ends the sequence
    return certified, method

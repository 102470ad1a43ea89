"""Conformal calibration of CATs (Schuster et al., EMNLP 2021, sec. 4.2-4.3): a threshold on
the meta consistency score under which the early-exit prediction agrees with the full model
at rate ``1 - epsilon``.

Reference: the authors' conformal library (``shared_early_exit``, "direct inner-outer method
of Cauchois et al."): per calibration row, the nonconformity is the *largest* meta score among
the exits whose prediction differs from the final exit's (rows with no such exit are left
out); the threshold is the ``1 - epsilon`` quantile of these values with ``+inf`` appended
(numpy's "higher" interpolation); a test row exits at the first exit whose score is *above*
the threshold. A row can then leave inconsistently only if one of its inconsistent exits
scored above the threshold, i.e. if its nonconformity does, which happens with probability at
most ``epsilon`` for a new exchangeable row ("nested": the same threshold at every exit).

That guarantee holds on average over the draw of the calibration rows. With ``delta`` the
threshold is instead the ``k``-th smallest nonconformity, ``k`` the smallest integer with
``P[Binomial(n, 1 - epsilon) <= k - 1] >= 1 - delta``: then, with probability at least
``1 - delta`` over the calibration rows, consistency on new rows is at least ``1 - epsilon``
(the training-conditional form of Vovk, 2012: the coverage of the k-th order statistic is
Beta(k, n - k + 1)). Too few rows for either (the threshold would be +inf: no row would ever
exit early, the guarantee kept by never using it), :func:`calibrate_cats` refuses and says how
many rows with an inconsistent exit it needs.

Deviation: the reference keeps only rows with an inconsistent exit for the quantile, and so
does this module; counting the other rows (whose nonconformity is -inf) would give a smaller
threshold with the same marginal guarantee. Consistency here is arg-max agreement, so the
method is for classification.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..analysis.replay import replay
from ..errors import ConfigError, InputError
from ..policies.base import get_policy
from .ltt import CalibrationRefused, binomial_cdf
from .thresholds import CalibrationResult

if TYPE_CHECKING:  # pragma: no cover
    from ..analysis.cache import ExitLogitsCache


def consistent_exits(logits: torch.Tensor) -> torch.Tensor:
    """(N, E) bool: exit k's arg-max equals the final exit's, from (N, E, C) logits."""
    pred = logits.argmax(-1)
    return pred == pred[:, -1:]


def nonconformity(scores: torch.Tensor, consistent: torch.Tensor) -> torch.Tensor:
    """(M,) per row with at least one inconsistent early exit, the largest score among those
    exits. scores, consistent: (N, E) (the final column is ignored)."""
    s, y = scores[:, :-1].double(), consistent[:, :-1]
    masked = torch.where(y, torch.full_like(s, -math.inf), s)
    rows = (~y).any(1)
    return masked[rows].max(1).values


def conformal_threshold(values: torch.Tensor, epsilon: float, delta: float | None = None
                        ) -> float:
    """The threshold from nonconformity ``values`` (M,) (see the module doc); +inf when no
    value can serve."""
    if not 0.0 < float(epsilon) < 1.0:
        raise ConfigError(f"epsilon must be in (0, 1), got {epsilon}")
    if delta is not None and not 0.0 < float(delta) < 1.0:
        raise ConfigError(f"delta must be in (0, 1) or None, got {delta}")
    ordered = torch.sort(values.double()).values.tolist()
    n = len(ordered)
    if delta is None:
        # numpy.quantile(values + [inf], 1 - epsilon, "higher"): index ceil(q * (len - 1))
        with_inf = ordered + [math.inf]
        index = math.ceil((1.0 - float(epsilon)) * (len(with_inf) - 1))
        return with_inf[min(index, len(with_inf) - 1)]
    def enough(k: int) -> bool:
        return binomial_cdf(k - 1, n, 1.0 - float(epsilon)) >= 1.0 - float(delta)

    if n == 0 or not enough(n):
        return math.inf
    lo, hi = 1, n  # the smallest k that is enough (the CDF grows with k): bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return ordered[lo - 1]


def rows_needed(epsilon: float, delta: float | None) -> int:
    """The fewest nonconformity values for which :func:`conformal_threshold` is finite:
    ceil(1 / epsilon) on average (the "higher" quantile index below the appended +inf), and
    with ``delta`` the smallest M with 1 - (1 - epsilon)^M >= 1 - delta (k = M)."""
    e = float(epsilon)
    if delta is None:
        return math.ceil(1.0 / e - 1e-9)
    return math.ceil(math.log(float(delta)) / math.log1p(-e) - 1e-9)


def calibrate_cats(cache: ExitLogitsCache, epsilon: float, delta: float | None = 0.1,
                   temperatures: Any = None) -> CalibrationResult:
    """The ``cats`` policy whose threshold keeps consistency with the full model at
    ``1 - epsilon`` (with probability ``1 - delta``; ``delta=None``: on average), from a
    held-out cache of a model with the ``cats`` exit scorer. ``heldout`` reports the
    consistency, exits and speed-up observed on the cache itself."""
    if cache.scores is None or cache.meta.get("scorer", "cats") != "cats":
        raise InputError("CATs calibration needs the meta consistency scores: collect the "
                         "cache from a model with the cats exit scorer (this cache's scores: "
                         f"{cache.meta.get('scorer') if cache.scores is not None else None})")
    if cache.task != "classification":
        raise ConfigError("CATs calibrates consistency of predicted classes; this cache is "
                          f"a {cache.task} model's")
    consistent = consistent_exits(cache.logits)
    values = nonconformity(cache.scores, consistent)
    tau = conformal_threshold(values, epsilon, delta)
    if math.isinf(tau):
        need = rows_needed(epsilon, delta)
        raise CalibrationRefused(
            f"CATs' conformal threshold at epsilon={float(epsilon):g}"
            + ("" if delta is None else f", delta={float(delta):g}")
            + f" needs at least {need} held-out rows with an early exit that disagrees with "
            f"the final one; these {cache.num_examples} rows have {values.numel()}. With "
            "fewer, no row could ever exit early: give more held-out rows (or a larger epsilon)")
    # The policy exits when score > threshold; scores are probabilities, so 1.0 = never.
    policy = get_policy("cats", threshold=min(max(tau, 0.0), 1.0))
    temps = [1.0] * cache.num_exits if temperatures is None else [float(t) for t in temperatures]
    res = replay(policy, cache, temps)
    rows = torch.arange(cache.num_examples)
    agree = consistent[rows, res.exit_index]
    heldout = {**res.metrics(), "consistency": float(agree.double().mean()),
               "nonconformity_rows": int(values.numel()), "threshold": tau,
               "met_target": bool(float(agree.double().mean()) >= 1.0 - float(epsilon))}
    target = {"kind": "consistency", "epsilon": float(epsilon),
              "delta": None if delta is None else float(delta),
              "guarantee": f"consistency with the full model >= {1 - float(epsilon):g}"
                           + ("" if delta is None else f" with probability >= {1 - delta:g}")}
    return CalibrationResult(policy=policy, target=target, heldout=heldout, temperatures=temps)

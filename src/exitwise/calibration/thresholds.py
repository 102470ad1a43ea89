"""Pick a policy's parameter to meet a target on a held-out exit-logits cache.

Every search sweeps ``policy.grid(E)`` and replays each value on the cache (the same
decisions the runtime would make), then picks:

* :func:`search_accuracy_drop`: the fastest setting (highest FLOPs speed-up) whose accuracy
  stays within ``max_drop`` of the full-depth accuracy (the final exit's accuracy on the same
  cache); with ``delta``, whose drop is *certified* within ``max_drop`` at level ``delta``
  (:mod:`exitwise.calibration.certify`) instead of merely observed so on the held-out rows;
* :func:`search_budget`: the most accurate setting whose mean compute, as a fraction of the
  full-depth model's, is within ``budget``.

For a regression model (one output) "accuracy" is Pearson's r throughout, and a drop of one
point is 0.01 of r.

Among settings with identical results (a plateau of thresholds) the middle one is taken, so
that small shifts between held-out and test data move it least; a certified search takes the
fastest certified setting instead (fixed-sequence testing stops at the first one it cannot
certify, so a plateau's far side may not be reached).

The cache MUST be held-out data: a slice of the training data the model did not train on.
Never calibrate on the split you report results on; these functions take no evaluation split
on purpose.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..analysis.cache import ExitLogitsCache
from ..analysis.curves import as_policy
from ..analysis.replay import ReplayResult, replay, summarize
from ..analysis.scores import REGRESSION, predictions_of
from ..errors import ConfigError
from ..policies.base import ExitPolicy
from ..temperatures import same_temperatures, temperature_list
from .certify import RISKS, certify_candidates

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

Temps = torch.Tensor | Sequence[float] | None
# Accuracy/compute comparisons allow for float round-off in means over N rows.
_EPS = 1e-9


@dataclass
class CalibrationResult:
    """A calibrated policy and how it did on the held-out cache.

    policy:       the policy with its tuned parameter set to the chosen value.
    target:       what was asked, e.g. ``{"kind": "accuracy_drop", "max_drop": 0.01}``.
    heldout:      the chosen setting's replay metrics on the held-out cache (accuracy,
                  mean_layers, flops_speedup, relative_compute, exit_histogram ...), plus
                  ``full_accuracy`` and ``met_target``.
    temperatures: the per-exit temperatures the search replayed with (must be the model's).
    curve:        every grid point evaluated: {param, accuracy, mean_layers, flops_speedup,
                  relative_compute}; a certified search (``delta``) keeps only the settings it
                  certified.
    """

    policy: ExitPolicy
    target: dict[str, Any]
    heldout: dict[str, Any]
    temperatures: list[float]
    curve: list[dict[str, Any]] = field(default_factory=list)

    @property
    def param(self) -> Any:
        return self.policy.value

    @property
    def met_target(self) -> bool:
        return bool(self.heldout.get("met_target", False))

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "target": dict(self.target),
            "heldout": dict(self.heldout),
            "temperatures": list(self.temperatures),
        }


def _prepare(policy: ExitPolicy | str, cache: ExitLogitsCache) -> ExitPolicy:
    policy = as_policy(policy)
    if policy.needs_labels:
        raise ConfigError(
            f"policy {policy.registered_name!r} needs labels at run time (analysis only); "
            "it cannot be calibrated for deployment"
        )
    cache.check(need_labels=True)
    return policy


Sweep = list[tuple[ExitPolicy, ReplayResult]]


def _sweep(policy: ExitPolicy, cache: ExitLogitsCache, temps: list[float]) -> Sweep:
    candidates = [policy.with_param(v) for v in policy.grid(cache.num_exits)]
    return [(p, replay(p, cache, temps)) for p in candidates]


def _pick(
    sweep: Sweep,
    ok: Callable[[ReplayResult], bool],
    score: Callable[[ReplayResult], tuple[float, ...]],
) -> tuple[ExitPolicy, ReplayResult] | None:
    """Best-scoring qualifying entry; the middle one (in grid order) among exact ties."""
    qualifying = [item for item in sweep if ok(item[1])]
    if not qualifying:
        return None

    def key(r: ReplayResult) -> tuple[float, ...]:  # an undefined score (NaN) never wins
        return tuple(float("-inf") if math.isnan(x) else x for x in score(r))

    best = max(key(r) for _, r in qualifying)
    ties = [item for item in qualifying if key(item[1]) == best]
    return ties[len(ties) // 2]


def _result(
    chosen: tuple[ExitPolicy, ReplayResult],
    target: dict[str, Any],
    full_accuracy: float,
    met: bool,
    temps: list[float],
    sweep: Sweep,
) -> CalibrationResult:
    policy, res = chosen
    heldout = res.metrics()
    heldout.update(
        full_accuracy=full_accuracy,
        accuracy_drop_points=100.0 * (full_accuracy - res.score),
        met_target=met,
    )
    curve = [
        {
            "param": p.value,
            "accuracy": r.accuracy,
            "score": r.score,
            "mean_layers": r.mean_layers,
            "flops_speedup": r.flops_speedup,
            "relative_compute": r.relative_compute,
        }
        for p, r in sweep
    ]
    return CalibrationResult(policy, target, heldout, temps, curve)


def _number(value: Any) -> float:
    """A target as a float; ConfigError for anything that is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"a calibration target must be a number, got {value!r}")
    return float(value)


def full_depth_accuracy(cache: ExitLogitsCache) -> float:
    """Accuracy (Pearson's r for regression) of the final exit on the (fully labeled) cache."""
    cache.check(need_labels=True)
    last = torch.full((cache.num_examples,), cache.num_exits - 1, dtype=torch.long)
    return summarize(cache, last).score


def _choose(sweep, ok, score, fallback, miss: str):
    """(best setting meeting ``ok`` by ``score``, True); when none does, warn with ``miss``
    and return (best by ``fallback``, False)."""
    chosen = _pick(sweep, ok=ok, score=score)
    if chosen is not None:
        return chosen, True
    # stacklevel 3: point at the caller of search_accuracy_drop / search_budget
    warnings.warn(miss, stacklevel=3)
    chosen = _pick(sweep, ok=lambda r: True, score=fallback)
    assert chosen is not None
    return chosen, False


def search_accuracy_drop(
    policy: ExitPolicy | str,
    cache: ExitLogitsCache,
    temperatures: Temps = None,
    max_drop: float | None = None,
    *,
    max_drop_points: float | None = None,
    delta: float | None = None,
    risk: str = "drop",
) -> CalibrationResult:
    """The fastest setting whose held-out accuracy >= full-depth accuracy - allowed drop.

    ``delta`` (e.g. 0.1): instead, the fastest setting whose drop is *certified* within the
    target with probability >= 1 - delta (upper confidence bound; ``risk="drop"``, or
    ``"disagreement"`` with the final exit), see :mod:`exitwise.calibration.certify`;
    ``heldout`` then also holds ``certified_bound_points`` and ``delta``. Raises
    :class:`~exitwise.calibration.CalibrationRefused` when the cache is too small for any
    setting to be certified.

    Give the allowed drop either as a fraction (``max_drop=0.01``) or in accuracy points
    (``max_drop_points=1.0``, the same thing), not both. ``temperatures``: the model's (E,)
    temperatures (None = 1). If no setting qualifies, the most accurate one is returned with
    ``heldout["met_target"] = False`` and a warning.

    Raises ConfigError for a drop outside [0, 1] (fraction) / [0, 100] (points) or a policy
    that needs labels; InputError for an empty cache, NaN logits or unknown labels.
    """
    if (max_drop is None) == (max_drop_points is None):
        raise ConfigError("give exactly one of max_drop (fraction) or max_drop_points (points)")
    if risk not in RISKS:
        raise ConfigError(f"risk must be one of {', '.join(RISKS)}; got {risk!r}")
    if max_drop is not None:
        drop, given = _number(max_drop), f"max_drop={max_drop!r}"
    else:
        drop, given = _number(max_drop_points) / 100.0, f"max_drop_points={max_drop_points!r}"
    if not 0.0 <= drop <= 1.0:  # also False for nan
        raise ConfigError(
            f"{given} is out of range: use a fraction in [0, 1] or points in [0, 100]"
        )
    policy = _prepare(policy, cache)
    temps = temperature_list(temperatures, cache.num_exits)
    full = full_depth_accuracy(cache)
    target = {"kind": "accuracy_drop", "max_drop": float(drop), "max_drop_points": 100.0 * drop}
    if delta is not None:
        return _certified(policy, cache, temps, full, drop, float(delta), risk, target)
    sweep = _sweep(policy, cache, temps)
    if risk == "disagreement":  # observed share of rows whose answer differs from full depth
        if cache.task == REGRESSION:
            raise ConfigError("disagreement with the final exit is a classification risk; "
                              "a regression model is calibrated on its Pearson drop")
        final = predictions_of(cache.logits[:, -1])
        target = {**target, "risk": risk}

        def ok(r: ReplayResult) -> bool:
            return float((r.predictions != final).double().mean()) <= drop + _EPS
        what = "agrees with full depth on all but"
    else:
        def ok(r: ReplayResult) -> bool:
            return r.score >= full - drop - _EPS
        what = "keeps accuracy within"
    chosen, met = _choose(
        sweep, ok=ok,
        score=lambda r: (r.flops_speedup, r.score),
        fallback=lambda r: (r.score, r.flops_speedup),
        miss=f"{policy.registered_name}: no setting {what} {100 * drop:.2f} points of full "
        "depth on the held-out cache; returning the most accurate one",
    )
    return _result(chosen, target, full, met, temps, sweep)


def _certified(
    policy: ExitPolicy, cache: ExitLogitsCache, temps: list[float], full: float, drop: float,
    delta: float, risk: str, target: dict[str, Any],
) -> CalibrationResult:
    """The certified variant of :func:`search_accuracy_drop` (see there)."""
    certified, method = certify_candidates(policy, cache, temps, drop, delta, risk)
    target = {**target, "delta": delta, "risk": risk, "testing": method}
    sweep = [(p, r) for p, r, _, _ in certified]
    if not certified:  # honest: nothing beats full depth with the guarantee asked for
        warnings.warn(
            f"{policy.registered_name}: no setting's {risk} is certified within "
            f"{100 * drop:.2f} points at delta={delta}; returning the safest setting",
            stacklevel=3,
        )
        sweep = _sweep(policy, cache, temps)
        safest, res = min(sweep, key=lambda item: (item[1].flops_speedup, -item[1].score))
        out = _result((safest, res), target, full, False, temps, sweep)
        out.heldout.update(certified_bound_points=None, delta=delta, risk=risk)
        return out
    best = max(range(len(certified)), key=lambda i: (certified[i][1].flops_speedup,
                                                    certified[i][1].score))
    chosen, res, bound, seen = certified[best]
    out = _result((chosen, res), target, full, True, temps, sweep)
    out.heldout.update(certified_bound_points=100.0 * bound, observed_points=100.0 * seen,
                       delta=delta, risk=risk, testing=method)
    return out


def search_budget(
    policy: ExitPolicy | str,
    cache: ExitLogitsCache,
    temperatures: Temps = None,
    budget: float | None = None,
) -> CalibrationResult:
    """The most accurate setting whose mean compute / full-depth compute <= ``budget``.

    budget: a fraction in (0, 1] (0.5 = half the FLOPs of the plain model on average).
    If even the cheapest setting exceeds it, the cheapest is returned with
    ``heldout["met_target"] = False`` and a warning.

    Raises ConfigError for a budget outside (0, 1] or a policy that needs labels; InputError
    for an empty cache, NaN logits or unknown labels.
    """
    if budget is None:
        raise ConfigError("give a compute budget: a fraction of full-depth FLOPs in (0, 1]")
    if not 0.0 < _number(budget) <= 1.0:  # also False for nan
        raise ConfigError(f"budget={budget!r} is out of range: use a fraction in (0, 1]")
    policy = _prepare(policy, cache)
    temps = temperature_list(temperatures, cache.num_exits)
    full = full_depth_accuracy(cache)
    sweep = _sweep(policy, cache, temps)
    target = {"kind": "budget", "budget": float(budget)}
    chosen, met = _choose(
        sweep,
        ok=lambda r: r.relative_compute <= budget + _EPS,
        score=lambda r: (r.score, r.flops_speedup),
        fallback=lambda r: (r.flops_speedup, r.score),
        miss=f"{policy.registered_name}: no setting fits a compute budget of {budget:.3f} on "
        "the held-out cache; returning the cheapest one",
    )
    return _result(chosen, target, full, met, temps, sweep)


def store_calibration(
    model: "MultiExitModel", name: str, result: CalibrationResult, make_default: bool = False
) -> None:
    """Record ``result`` in ``model.calibration`` (saved with the model) under ``name``.

    Writes ``model.calibration["policies"][name] = {"policy", "target", "heldout",
    "temperatures"}`` (the last: the model's temperatures it was searched under, which
    :meth:`MultiExitModel.calibrated_policy` checks) and makes it the default when there is
    none yet (or ``make_default``). The search must have
    used the model's own temperatures (apply them first with ``apply_temperatures``), since
    the runtime scales logits by ``model.temperatures``; otherwise ConfigError.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a calibration needs a non-empty name, got {name!r}")
    have, used = model.temperature_list(), result.temperatures
    if not same_temperatures(have, used, model.temperatures.dtype):
        raise ConfigError(
            f"the search used temperatures {result.temperatures} but the model has {have}; "
            "apply_temperatures(model, temps) first, or search with model.temperatures"
        )
    entry = {
        "policy": result.policy.to_dict(),
        "target": dict(result.target),
        "heldout": dict(result.heldout),
        # what the certificate assumed: a later run that fits other temperatures voids it
        "temperatures": [float(t) for t in have],
    }
    json.dumps(entry)  # fail here, not at save time, if something is not JSON-able
    model.calibration.setdefault("policies", {})[name] = entry
    if make_default or not model.calibration.get("default"):
        model.calibration["default"] = name


def drop_stale_calibrations(model: "MultiExitModel", previous: Sequence[float]) -> list[str]:
    """Remove the stored calibrations that were searched under other temperatures than the
    model's now (an entry without a record counts as made under ``previous``, the
    temperatures before the latest change); returns their names. The default moves to the
    first entry left (none when none is). Their thresholds were chosen, and their
    certificates hold, for the temperatures they were searched with only."""
    now = model.temperature_list()
    policies = model.calibration.get("policies", {})
    stale = [name for name, entry in policies.items()
             if not same_temperatures(entry.get("temperatures", previous), now,
                                      model.temperatures.dtype)]
    for name in stale:
        del policies[name]
    if model.calibration.get("default") in stale:
        model.calibration["default"] = next(iter(policies), None)
    return stale

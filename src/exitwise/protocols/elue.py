"""The ELUE score (Liu et al., NAACL 2022, "Towards Efficient NLP: A Standard Evaluation and A
Strong Baseline", the ELUE benchmark's evaluation: "ELUE score").

A method's (FLOPs, performance) points are compared with a baseline's performance-FLOPs curve
at the same cost::

    score = 1/n * sum_i [ p_i - p_base(f_i) ]

where ``p_base`` interpolates the baseline's points. In ELUE the baseline is ElasticBERT-base
truncated after each of its L layers (L static models, L points per task); the benchmark's
score is computed per task and averaged over the tasks (:func:`elue_benchmark`). Here the
caller passes the baseline points, e.g. each exit of an ``elasticbert``-trained model run
statically: ``[(p["mean_flops"], p["accuracy"]) for p in anytime(cache)["points"]]``
(:func:`~exitwise.protocols.measures.anytime`). A positive score means the method's points
lie above the baseline curve on average.

Sources (the paper's own text was not available here; these state the same formula): the
public source of the ELUE leaderboard website (its About page: "the performance-FLOPs curve
that is obtained by interpolating the coordinates of ElasticBERT-base"; its submission
service, which runs a script ``elue_score.py`` on the submitted FLOPs and performances in
percent and rounds the result to 2 decimals); the CCL 2022 CELUE task description
(fastnlp/CCL2022-CELUE README: one score per dataset, then their mean). That script is in
none of the public copies searched, and no source fixes the interpolation; the conventions
here are this module's choices where the sources are silent (state them when reporting a
score):

- interpolation: piecewise linear between consecutive baseline points, on the raw FLOPs axis
  (``log_flops=True``: linear in log FLOPs instead);
- points outside the baseline's FLOPs range: ``outside="extrapolate"`` (default) continues the
  first / last baseline segment; ``"clamp"`` holds the end point's performance; ``"error"``
  refuses them;
- units: performance as given (ELUE reports percent, so a score of 1.0 is one point); FLOPs in
  any unit, the same for both curves.

Input rules (an :class:`~exitwise.errors.InputError` otherwise): every coordinate finite, every
FLOPs value > 0; at least one method point (in any order); at least two baseline points with
strictly increasing FLOPs (a baseline out of order is usually mislabeled data, so it is
refused rather than sorted).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError, InputError

Point = Sequence[float]  # (flops, performance)
OUTSIDE = ("extrapolate", "clamp", "error")


def _checked(points: Sequence[Point], what: str) -> list[tuple[float, float]]:
    """``points`` as (flops, performance) float pairs; finite, FLOPs > 0, non-empty."""
    try:
        pairs = [(float(f), float(p)) for f, p in points]
    except (TypeError, ValueError):
        raise InputError(
            f"{what} must be a sequence of (flops, performance) pairs of numbers"
        ) from None
    if not pairs:
        raise InputError(f"{what} is empty: give at least one (flops, performance) point")
    for i, (f, p) in enumerate(pairs):
        if not (math.isfinite(f) and math.isfinite(p)):
            raise InputError(f"{what}[{i}] = ({f}, {p}) is not finite")
        if f <= 0:
            raise InputError(f"{what}[{i}] has FLOPs {f}; FLOPs must be > 0")
    return pairs


def _checked_baseline(baseline: Sequence[Point]) -> list[tuple[float, float]]:
    pairs = _checked(baseline, "baseline")
    if len(pairs) < 2:
        raise InputError("the baseline curve needs at least two (flops, performance) points")
    for i in range(1, len(pairs)):
        if not pairs[i][0] > pairs[i - 1][0]:
            raise InputError(
                f"baseline FLOPs must be sorted, strictly increasing; baseline[{i}] has "
                f"{pairs[i][0]} after {pairs[i - 1][0]}"
            )
    return pairs


def baseline_performance(
    baseline: Sequence[Point],
    flops: float,
    outside: str = "extrapolate",
    log_flops: bool = False,
) -> float:
    """``p_base(flops)``: the baseline curve's performance at ``flops`` (conventions in the
    module doc)."""
    if outside not in OUTSIDE:
        raise ConfigError(f"outside must be one of {OUTSIDE}, got {outside!r}")
    curve = _checked_baseline(baseline)
    f = _checked([(flops, 0.0)], "flops")[0][0]
    return _interpolate(curve, f, outside, bool(log_flops))


def _interpolate(
    curve: list[tuple[float, float]], f: float, outside: str, log_flops: bool
) -> float:
    xs = [math.log(x) if log_flops else x for x, _ in curve]
    ys = [y for _, y in curve]
    x = math.log(f) if log_flops else f
    if not xs[0] <= x <= xs[-1]:
        if outside == "error":
            raise InputError(
                f"a point at {f} FLOPs lies outside the baseline's range "
                f"[{curve[0][0]}, {curve[-1][0]}] (outside='error')"
            )
        if outside == "clamp":
            return ys[0] if x < xs[0] else ys[-1]
    # segment i: xs[i] <= x <= xs[i+1]; the first / last segment beyond the range
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


def elue_score(
    points: Sequence[Point],
    baseline: Sequence[Point],
    outside: str = "extrapolate",
    log_flops: bool = False,
) -> float:
    """ELUE score of one task: the mean over ``points`` of ``performance - p_base(flops)``.

    points: the method's (flops, performance) pairs, n >= 1, any order.
    baseline: the baseline curve's (flops, performance) pairs, >= 2, FLOPs strictly increasing.
    outside / log_flops: the conventions in the module doc.
    """
    if outside not in OUTSIDE:
        raise ConfigError(f"outside must be one of {OUTSIDE}, got {outside!r}")
    curve = _checked_baseline(baseline)
    pairs = _checked(points, "points")
    gaps = [p - _interpolate(curve, f, outside, bool(log_flops)) for f, p in pairs]
    return sum(gaps) / len(gaps)


def elue_benchmark(
    tasks: Mapping[str, tuple[Sequence[Point], Sequence[Point]]],
    outside: str = "extrapolate",
    log_flops: bool = False,
) -> dict[str, Any]:
    """ELUE's benchmark score: :func:`elue_score` per task, then their unweighted mean.

    tasks: ``{task name: (method points, baseline points)}``, at least one task.
    Returns ``{"protocol": "elue", "tasks": {name: score}, "score": mean, "outside": ...,
    "log_flops": ...}``.
    """
    if not tasks:
        raise InputError("no tasks given: pass {task: (points, baseline)}")
    per_task = {}
    for name, pair in tasks.items():
        try:
            points, baseline = pair
        except (TypeError, ValueError):
            raise InputError(f"task {name!r}: give a (points, baseline) pair") from None
        try:
            per_task[str(name)] = elue_score(points, baseline, outside, log_flops)
        except InputError as err:
            raise InputError(f"task {name!r}: {err}") from None
    return {
        "protocol": "elue",
        "tasks": per_task,
        "score": sum(per_task.values()) / len(per_task),
        "outside": outside,
        "log_flops": bool(log_flops),
    }

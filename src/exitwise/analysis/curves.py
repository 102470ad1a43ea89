"""Accuracy-vs-compute curves: sweep a policy's parameter grid by replay, plot, save.

A point is a dict ``{"param", "accuracy", "score", "mean_layers", "flops_speedup",
"relative_compute", "mean_flops"}`` (relative_compute = mean FLOPs / mean full-depth FLOPs;
``score`` is the task metric: accuracy, or Pearson's r for a regression model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import InputError
from ..policies.base import ExitPolicy, get_policy
from .cache import ExitLogitsCache
from .replay import replay, summarize

Point = dict[str, Any]
Temps = torch.Tensor | Sequence[float] | None


def as_policy(policy: ExitPolicy | str) -> ExitPolicy:
    """A policy object from an object or a registered name (default parameters)."""
    return get_policy(policy) if isinstance(policy, str) else policy


def _point(res: Any, **extra: Any) -> Point:
    """One curve point: ``extra`` keys first, then the replay's scalar metrics."""
    metrics = res.metrics()
    keys = ("accuracy", "score", "mean_layers", "mean_flops", "flops_speedup",
            "relative_compute")
    return {**extra, **{k: metrics[k] for k in keys}}


def policy_curve(
    policy: ExitPolicy | str, cache: ExitLogitsCache, temperatures: Temps = None
) -> list[Point]:
    """Replay ``policy`` at every value of ``policy.grid(E)``: one point per value, in grid
    order. The cache must be fully labeled."""
    policy = as_policy(policy)
    cache.check(need_labels=True)
    points = []
    for value in policy.grid(cache.num_exits):
        candidate = policy.with_param(value)
        points.append(_point(replay(candidate, cache, temperatures), param=value))
    return points


def curves_for_policies(
    names: Iterable[ExitPolicy | str], cache: ExitLogitsCache, temperatures: Temps = None
) -> dict[str, list[Point]]:
    """``{policy name: policy_curve(...)}`` for several policies (names or objects)."""
    out: dict[str, list[Point]] = {}
    for item in names:
        policy = as_policy(item)
        out[policy.registered_name] = policy_curve(policy, cache, temperatures)
    return out


def static_points(cache: ExitLogitsCache) -> list[Point]:
    """One point per exit: every row leaves at exit k (truncating the network there)."""
    cache.check(need_labels=True)
    points = []
    for k in range(cache.num_exits):
        res = summarize(cache, torch.full((cache.num_examples,), k, dtype=torch.long))
        points.append(_point(res, param=k, exit_layer=cache.exit_layers[k]))
    return points


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both accuracy (higher) and compute (lower).

    Sorted by relative compute, cheapest first; each kept point is strictly more accurate
    than every cheaper one.
    """
    ordered = sorted(points, key=lambda p: (_compute(p), -_score(p)))
    front: list[Point] = []
    best = -math.inf
    for p in ordered:
        if _score(p) > best:
            front.append(p)
            best = _score(p)
    return front


def _score(p: Point) -> float:
    """The task metric of a point (older points carry accuracy only)."""
    value = p.get("score")
    return float(p["accuracy"] if value is None else value)


def _compute(p: Point) -> float:
    if "relative_compute" in p:
        return float(p["relative_compute"])
    return 1.0 / float(p["flops_speedup"])


def save_curves_json(curves: dict[str, list[Point]], path: str | Path, **extra: Any) -> Path:
    """Write ``{"curves": curves, **extra}`` as JSON (e.g. extra=static points, full accuracy)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"curves": curves, **extra}, indent=2, default=_jsonable))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def plot_curves(
    curves: dict[str, list[Point]],
    path_png: str | Path,
    full_accuracy: float | None = None,
    static: Sequence[Point] | None = None,
    title: str | None = None,
    metric: str = "accuracy",
) -> Path:
    """Accuracy vs relative compute, one line per policy (its Pareto front), plus the
    per-exit static points and a horizontal line at the full-depth accuracy.

    Uses matplotlib's Agg canvas directly, so the global backend is never touched.
    """
    if not curves and not static:
        raise InputError("nothing to plot: give at least one curve or static points")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in curves.items():
        front = pareto_front(points)
        if not front:
            continue
        xs = [_compute(p) for p in front]
        ys = [100.0 * _score(p) for p in front]
        ax.plot(xs, ys, marker=".", linewidth=1.4, markersize=4, label=name)
    if static:
        xs = [_compute(p) for p in static]
        ys = [100.0 * _score(p) for p in static]
        ax.scatter(xs, ys, marker="s", color="black", s=18, zorder=3, label="static exits")
    if full_accuracy is not None:
        ax.axhline(100.0 * full_accuracy, color="gray", linestyle="--", linewidth=1,
                   label="full depth")
    ax.set_xlabel("relative compute (mean FLOPs / full-depth FLOPs)")
    ax.set_ylabel(f"{metric} (%)" if metric == "accuracy" else f"{metric} x 100")
    ax.set_xlim(left=0.0)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    out = Path(path_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), format="png", bbox_inches="tight")
    return out

"""E2CM's threshold search: random per-exit thresholds, keep the convex-hull frontier.

Following the reference (``alperengormez/class_means``, ``class_means.py``, "Class means
thresholding" and "convex hull for threshold"): draw ``trials`` threshold vectors with every
entry uniform in [0, 1) (``np.random.uniform(0, 1, E-1)``, 100 trials), replay each on the
fitting data with E2CM's rule (leave at the first exit whose top probability is strictly above
its threshold), and keep the vectors on the convex hull of the (compute, accuracy) points as
the operating points. They go into an :class:`~exitwise.policies.e2cm.E2CMPolicy` table,
keyed by their mean compute (a fraction of the full-depth model's).

Deviations: the reference scores the trials on the training set and keeps every hull vertex;
here the trials run on a held-out exit-logits cache (the project's rule for calibration) and
only the upper-left side of the hull is kept (from the cheapest point to the most accurate
one; the lower side holds the worst trade-offs). The full-depth setting (no early exit) is
always among the candidates, so the frontier ends at the model's own accuracy. Compute is the
cache's FLOPs (the reference's hand-counted FLOPs table plays that role).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis.cache import ExitLogitsCache
from ..analysis.replay import replay, summarize
from ..errors import ConfigError, InputError
from ..policies.e2cm import E2CMPolicy
from .budget import top_probabilities


@dataclass
class E2CMFit:
    """The fitted frontier and what every candidate did on the fitting cache.

    policy: an E2CMPolicy holding the frontier (its ``cost`` set to the most accurate point).
    points: one dict per operating point: cost, accuracy, thresholds (E-1), heldout metrics.
    candidates: (cost, accuracy) of every candidate tried, in the order tried (the last one
        is the full-depth setting).
    """

    policy: E2CMPolicy
    points: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "points": self.points,
                "candidates": [list(c) for c in self.candidates]}


def e2cm_exits(top: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """(N,) exit index of every row under E2CM's rule: the first exit k < E-1 with
    ``top[:, k] > thresholds[k]``, else the last. ``top``: (N, E) float32 top probabilities.
    The comparison is the policy's own (float32 tensor against a Python float)."""
    n, num_exits = top.shape
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long)
    free = torch.ones(n, dtype=torch.bool)
    for k in range(num_exits - 1):
        leave = free & (top[:, k] > float(thresholds[k]))
        exit_index[leave] = k
        free &= ~leave
    return exit_index


def upper_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points on the upper-left side of the convex hull of (cost, accuracy):
    from the cheapest point to the most accurate one, cost and accuracy strictly rising.
    Among points of equal cost the most accurate (then the first) stands for them."""
    best: dict[float, int] = {}
    for i, (c, a) in enumerate(points):
        if c not in best or a > points[best[c]][1]:
            best[c] = i
    order = sorted(best.values(), key=lambda i: points[i][0])
    hull: list[int] = []
    for i in order:
        x3, y3 = points[i]
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = points[hull[-2]], points[hull[-1]]
            # keep only right (clockwise) turns: the middle point must lie above the chord
            if (x2 - x1) * (y3 - y1) - (y2 - y1) * (x3 - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    top = max(range(len(hull)), key=lambda j: (points[hull[j]][1], -j))
    return hull[: top + 1]


def fit_e2cm_policy(
    cache: ExitLogitsCache,
    trials: int = 100,
    seed: int = 0,
    candidates: Sequence[Sequence[float]] | None = None,
    temperatures: torch.Tensor | Sequence[float] | None = None,
) -> E2CMFit:
    """E2CM's operating points on a held-out cache.

    trials: random threshold vectors to try (each entry uniform in [0, 1), from ``seed``).
    candidates: threshold vectors (E-1 each) to try instead of random ones.
    temperatures: the model's per-exit temperatures (the policy sees scaled logits).
    """
    cache.check(need_labels=True)
    if cache.task != "classification":
        raise ConfigError("E2CM's rule reads class probabilities; this cache is a regression "
                          "model's")
    num_exits = cache.num_exits
    if num_exits < 2:
        raise InputError("E2CM needs a model with at least two exits")
    if candidates is None:
        if not isinstance(trials, int) or trials < 1:
            raise ConfigError(f"trials must be a positive int, got {trials!r}")
        g = torch.Generator().manual_seed(int(seed))
        vectors = torch.rand(trials, num_exits - 1, generator=g, dtype=torch.float64).tolist()
    else:
        vectors = [[float(t) for t in row] for row in candidates]
        if not vectors or any(len(row) != num_exits - 1 for row in vectors):
            raise ConfigError(f"candidates must be lists of {num_exits - 1} thresholds")
    vectors.append([1.0] * (num_exits - 1))  # full depth: no probability is above 1
    top = top_probabilities(cache, temperatures)
    scored: list[tuple[float, float]] = []
    for row in vectors:
        res = summarize(cache, e2cm_exits(top, row))
        scored.append((float(res.relative_compute), float(res.accuracy)))
    keep = upper_frontier(scored)
    costs = [scored[i][0] for i in keep]
    table = [vectors[i] for i in keep]
    policy = E2CMPolicy(cost=costs[-1], costs=costs, thresholds=table)
    points = []
    for i, c in zip(keep, costs):
        res = replay(policy.with_param(c), cache, temperatures)
        points.append({"cost": c, "accuracy": scored[i][1], "thresholds": vectors[i],
                       "heldout": res.metrics()})
    return E2CMFit(policy=policy, points=points, candidates=scored)

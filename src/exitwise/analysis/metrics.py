"""Per-exit metrics and SDN's overthinking statistics on an exit-logits cache.

Overthinking (Kaya et al., "Shallow-Deep Networks", 2019), measured on labeled rows:

* wasteful: the row was already classified right by an exit *before* the final one, so the
  layers after it were spent for nothing;
* destructive: some non-final exit got the row right but the final exit gets it wrong, so
  the extra layers changed a right answer into a wrong one;
* oracle accuracy: some exit gets the row right (the accuracy of a perfect exit chooser).

All fractions are over the labeled rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import InputError
from .cache import ExitLogitsCache
from .replay import ReplayResult
from .scores import REGRESSION


def _labeled(cache: ExitLogitsCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct (M, E) bool, labels (M,)) for the M labeled rows; raises if there are none."""
    cache.check()
    if cache.task == REGRESSION:  # argmax of one output would count every row wrong
        raise InputError(
            "right/wrong per exit (accuracy, overthinking, selective classification) is a "
            "classification measure; for a regression cache read each exit's Pearson r from "
            "exitwise.analysis.static_points(cache) or replay(...).score")
    mask = cache.labeled
    if not bool(mask.any()):
        raise InputError("the cache has no labeled rows; accuracy needs labels")
    labels = cache.labels[mask]
    preds = cache.logits[mask].argmax(-1)  # (M, E)
    return preds == labels.unsqueeze(1), labels


def correct_matrix(cache: ExitLogitsCache) -> torch.Tensor:
    """(M, E) bool: exit k classifies labeled row m right."""
    return _labeled(cache)[0]


def per_exit_accuracy(cache: ExitLogitsCache) -> torch.Tensor:
    """(E,) float64: accuracy of each exit on the labeled rows."""
    return correct_matrix(cache).double().mean(0)


def exit_histogram(
    exit_index: torch.Tensor, num_exits: int, normalize: bool = False
) -> torch.Tensor:
    """(E,) rows per exit (or fractions with ``normalize``) from a (N,) exit assignment."""
    idx = torch.as_tensor(exit_index).long().reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_exits):
        raise InputError(f"exit indices must be in [0, {num_exits})")
    counts = torch.bincount(idx, minlength=num_exits)
    if normalize:
        return counts.double() / max(idx.numel(), 1)
    return counts


def relative_exit_costs(cache: ExitLogitsCache) -> torch.Tensor:
    """(E,) float64: mean cost of leaving at exit k / mean full-depth cost."""
    cache.check()
    return cache.costs.mean(0) / cache.full_cost.mean()


def overthinking(cache: ExitLogitsCache) -> dict[str, Any]:
    """SDN overthinking numbers (see the module docstring), fractions of labeled rows.

    Returns keys: ``wasteful``, ``destructive``, ``oracle_accuracy``, ``final_accuracy``,
    ``earliest_correct`` ((E+1,) fractions: first exit that is right; the last entry counts
    rows no exit gets right) and ``num_labeled``.
    """
    correct, _ = _labeled(cache)
    m, e = correct.shape
    any_early = correct[:, :-1].any(1)
    final = correct[:, -1]
    any_right = correct.any(1)
    first = torch.where(any_right, correct.int().argmax(1), torch.full((m,), e))
    return {
        "wasteful": float(any_early.double().mean()),
        "destructive": float((any_early & ~final).double().mean()),
        "oracle_accuracy": float(any_right.double().mean()),
        "final_accuracy": float(final.double().mean()),
        "earliest_correct": (torch.bincount(first, minlength=e + 1).double() / m).tolist(),
        "num_labeled": int(m),
    }


def summary_table(
    cache: ExitLogitsCache,
    results: Mapping[str, ReplayResult] | None = None,
) -> str:
    """A plain-text report: one line per exit (depth, accuracy, relative cost), the
    overthinking numbers, and one line per named replay result if given."""
    acc = per_exit_accuracy(cache)
    rel = relative_exit_costs(cache)
    over = overthinking(cache)
    lines = [
        f"{cache.num_examples} examples ({over['num_labeled']} labeled), "
        f"{cache.num_exits} exits, {cache.num_classes} classes",
        "",
        f"{'exit':>4} {'layer':>5} {'accuracy':>9} {'rel. cost':>9}",
    ]
    for k, depth in enumerate(cache.exit_layers):
        lines.append(f"{k:>4} {depth:>5} {100 * float(acc[k]):>8.2f}% {float(rel[k]):>9.3f}")
    lines += [
        "",
        f"oracle accuracy      {100 * over['oracle_accuracy']:6.2f}%",
        f"wasteful (early ok)  {100 * over['wasteful']:6.2f}%",
        f"destructive          {100 * over['destructive']:6.2f}%",
    ]
    if results:
        lines += ["", f"{'policy':<24} {'accuracy':>9} {'layers':>7} {'speedup':>8}"]
        for name, res in results.items():
            lines.append(
                f"{name:<24} {100 * res.accuracy:>8.2f}% {res.mean_layers:>7.2f} "
                f"{res.flops_speedup:>7.2f}x"
            )
    return "\n".join(lines)

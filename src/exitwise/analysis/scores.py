"""The task metric of a set of predictions: accuracy for classes, Pearson's r for regression.

Kept apart from :mod:`.metrics` so that replay, calibration and evaluation (which all need
"the score" of an exit assignment) share one definition without importing each other.
Regression follows GLUE's STS-B: Pearson's r is the score, Spearman's rho and the mean squared
error are reported beside it.
"""

from __future__ import annotations

import math

import torch

CLASSIFICATION = "classification"
REGRESSION = "regression"


def task_of(num_labels: int) -> str:
    """Hugging Face's rule: one output is a regression, more are classes."""
    return REGRESSION if int(num_labels) == 1 else CLASSIFICATION


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two (N,) tensors (nan when either is constant or N < 2)."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    if x.numel() < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = float(xc.norm() * yc.norm())
    return float((xc * yc).sum()) / den if den > 0 else math.nan


def ranks(x: torch.Tensor) -> torch.Tensor:
    """(N,) ranks 1..N of ``x``, ties sharing their average rank (as scipy's rankdata)."""
    x = x.double().reshape(-1)
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    r = torch.empty_like(x)
    n, i = x.numel(), 0
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two (N,) tensors."""
    return pearson(ranks(x), ranks(y))


def predictions_of(logits: torch.Tensor) -> torch.Tensor:
    """(..., C) logits -> (...) predictions: the arg-max class, or the value when C == 1."""
    return logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(-1)


def score(predictions: torch.Tensor, labels: torch.Tensor, task: str) -> float:
    """Accuracy (classification) or Pearson's r (regression) of (N,) predictions."""
    if predictions.numel() == 0:
        return math.nan
    if task == REGRESSION:
        return pearson(predictions, labels)
    return float((predictions == labels).double().mean())


def regression_report(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Pearson, Spearman and mean squared error of (N,) predictions."""
    p, y = predictions.double().reshape(-1), labels.double().reshape(-1)
    return {"pearson": pearson(p, y), "spearman": spearman(p, y),
            "mse": float(((p - y) ** 2).mean()) if p.numel() else math.nan}

"""The Gaussian process behind the Bayesian searches of skipped sub-layers (SWIFT's
``layer_bayes_search``, :mod:`.swift`; Draft & Verify's ``LayerSkippingSearching``,
:mod:`.skip_bayes`). Both references use the ``bayes_opt`` package: a Matern 5/2 kernel, the
scores normalised, ``alpha=1e-2`` added to the kernel's diagonal, and an upper confidence
bound (mean + kappa std) maximised over 10,000 random points of [0, 1]^d. Here the kernel's
length scale is the one of a grid (0.1 .. 100) with the highest marginal likelihood, instead of
``bayes_opt``'s L-BFGS restarts; the callers state what replaces its L-BFGS refinement of the
acquisition. Shapes: n scored points, m query points, d dimensions.
"""

from __future__ import annotations

import math

import torch

GP_NOISE = 1e-2  # the references' set_gp_params(alpha=1e-2)
WARMUP_POINTS = 10_000  # bayes_opt's random points for maximising the acquisition
LENGTH_SCALES = tuple(10 ** (k / 4) for k in range(-4, 9))  # 0.1 .. 100


def matern52(a: torch.Tensor, b: torch.Tensor, length: float) -> torch.Tensor:
    """Matern 5/2 kernel between rows of a (n, d) and b (m, d) -> (n, m)."""
    r = torch.cdist(a, b) * (math.sqrt(5.0) / length)
    return (1.0 + r + r * r / 3.0) * torch.exp(-r)


def gp_posterior(x: torch.Tensor, y: torch.Tensor, query: torch.Tensor, length: float,
                 noise: float = GP_NOISE) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Gaussian-process regression with a Matern 5/2 kernel (unit signal variance) and
    ``noise`` added to the diagonal; x (n, d), y (n,) already normalised, query (m, d).
    Returns (mean (m,), std (m,), log marginal likelihood)."""
    k = matern52(x, x, length) + noise * torch.eye(len(x), dtype=x.dtype)
    chol = torch.linalg.cholesky(k)
    alpha = torch.cholesky_solve(y[:, None], chol)[:, 0]
    ks = matern52(query, x, length)  # (m, n)
    mean = ks @ alpha
    v = torch.cholesky_solve(ks.T, chol)  # (n, m)
    var = (1.0 - (ks * v.T).sum(1)).clamp(min=1e-12)
    loglik = float(-0.5 * y @ alpha - torch.log(torch.diagonal(chol)).sum()
                   - 0.5 * len(x) * math.log(2 * math.pi))
    return mean, var.sqrt(), loglik


def normalised(y: torch.Tensor) -> torch.Tensor:
    """Scores (n,) shifted to mean 0 and scaled to std 1 (left unscaled when all equal)."""
    std = y.std() if len(y) > 1 else y.new_tensor(0.0)
    return (y - y.mean()) / (std if float(std) > 0 else 1.0)


def best_length(x: torch.Tensor, y: torch.Tensor) -> float:
    """The grid's length scale with the highest marginal likelihood of (x (n, d), y (n,))."""
    return max(LENGTH_SCALES, key=lambda ls: gp_posterior(x, y, x[:1], ls)[2])


def ucb_argmax(x: torch.Tensor, y: torch.Tensor, query: torch.Tensor, kappa: float) -> int:
    """Index of the query point (m, d) with the highest upper confidence bound, mean + kappa
    std, of the GP fitted to x (n, d) and the raw scores y (n,) (normalised here)."""
    y = normalised(y)
    mean, std, _ = gp_posterior(x, y, query, best_length(x, y))
    return int(torch.argmax(mean + kappa * std))

"""``free_bmm``: FREE's shallow-deep exit with its adaptive threshold estimator (Bae et al.,
2023, "Fast and Robust Early-Exiting Framework for Autoregressive Language Models with
Synchronized Parallel Decoding", adaptive threshold estimation).

FREE has two paths: a *shallow* model (the first L_s blocks + an exit) and the *deep* one (all
blocks). A token leaves at the shallow exit when its confidence, the softmax top-1 minus
top-2 gap ``c = p1 - p2`` (the reference's ``softmax_confidence``), exceeds the threshold
``c > lambda``; otherwise it runs the deep model. Only the first exit the policy sees is the
shallow exit; at any later exit no row leaves (they all go to the last layer, the deep model).
Decode with ``exit_layers=[L_s]`` and ``kv="skip"`` (FREE's synchronized parallel decoding).

**Adaptive threshold.** Whenever the deep model's prediction for a token that was scored at the
shallow exit becomes known (the token went deep, or, with ``kv="skip"``/``"recompute"``, a
later deep step computed its skipped layers), the early-exit decoder reports the pair
(confidence c, consistent = shallow argmax == deep argmax) through :meth:`observe`. At the
start of every ``generate`` call (:meth:`begin_sequence`), while fewer than ``max_updates``
fits were done, a two-component Beta mixture is fitted to all pairs collected so far, and the
threshold becomes::

    x_j = lo + j (hi - lo) / (R - 1), j = 0..R-1        (R = resolution = 10, [lo, hi] = [0.3, 0.9])
    k   = component with the larger mean a / (a + b)    ("consistent")
    n   = #{ j : Beta(x_j; a_k, b_k) / (Beta(x_j; a_k, b_k) + Beta(x_j; a_o, b_o)) > zeta }
    lambda = x_{min(max(0, R - n), R - 1)}               (zeta = 0.4)

Before the first fit the fixed ``threshold`` applies (the reference's
``shallow2deep_conf_threshold``; its scripts use 0.9). With ``adaptive=False`` the policy is a
fixed-threshold shallow-deep exit (what offline replay and calibration sweeps see anyway: they
never call :meth:`observe`).

The mixture (:class:`BetaMixture`) follows the reference ``util/bmm.py`` (``BetaMixture1D``):
initial Beta(1, 2) and Beta(2, 1), weights (0.5, 0.5); data clipped to [1e-4, 1 - 1e-4]; one EM
iteration per fit; M-step by weighted moments (``fit_beta_weighted``: mean m, variance s2,
a = m (m (1 - m) / s2 - 1), b = a (1 - m) / m).

- With labels (what decoding supplies, the reference's ``fit(X, Y)`` in
  ``models/deploying_t5.py``): responsibilities come from the labels, r_k = (1 - lam_r)
  [y = k], floored at eps = 1e-4 and normalised over k (lam_r = 0.8). The reference first
  forms lam_r * (weighted likelihoods) but overwrites it on the next line, so as run only the
  labels count; this reproduces what it computes. Component parameters are replaced by the
  moments fit; the mixture weights do not change.
- Without labels (:meth:`BetaMixture.fit` with ``y=None``, the reference's unsupervised path):
  r_k = w_k Beta(x; a_k, b_k) / sum_j (...), floored and normalised as above, and every
  parameter moves by an exponential average, new = lam old + (1 - lam) fitted (lam = 0.95);
  weights from the summed responsibilities likewise.

Deviations: the reference refits at the start of each *sequence* (batch 1); here at the start
of each ``generate`` call (= per sequence at batch 1, per batch otherwise). It records pairs
only for the tokens of a deep step that follows skipped tokens; here every token whose deep
prediction is known is recorded. A zero weighted variance (all data equal) is floored at
1e-12 instead of dividing by zero. Fitted state is not part of ``to_dict`` (a rebuilt policy
starts from ``threshold`` again).

State: ``shallow_conf`` (B,) float, the confidence at the shallow exit (-1 before it), read by
the decoder to pair it with the deep prediction.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState, register_policy
from .calm_base import top2_gap

EPS_X = 1e-4  # EM on Beta distributions is undefined at 0 and 1
EPS_R = 1e-4  # floor of the responsibilities (the reference's eps_nan)


def beta_pdf(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Beta(a, b) density at x (N,) in (0, 1), float64 -> (N,)."""
    x = x.double()
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return torch.exp((a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x) - log_norm)


def fit_beta_weighted(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Weighted method-of-moments Beta fit: x, w (N,) -> (a, b)."""
    x, w = x.double(), w.double()
    mean = float((w * x).sum() / w.sum())
    var = max(float((w * (x - mean) ** 2).sum() / w.sum()), 1e-12)
    a = mean * (mean * (1 - mean) / var - 1)
    return a, a * (1 - mean) / mean


class BetaMixture:
    """Two-component Beta mixture over confidences in [0, 1] (reference ``BetaMixture1D``)."""

    def __init__(
        self,
        alphas: tuple[float, float] = (1.0, 2.0),
        betas: tuple[float, float] = (2.0, 1.0),
        weights: tuple[float, float] = (0.5, 0.5),
        lam: float = 0.95,
        lam_r: float = 0.8,
    ) -> None:
        self.alphas, self.betas, self.weights = list(alphas), list(betas), list(weights)
        self.lam, self.lam_r = lam, lam_r

    def likelihood(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return beta_pdf(x, self.alphas[k], self.betas[k])

    def responsibilities(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(2, N): per component, its share of each point (columns sum to 1)."""
        if y is None:
            r = torch.stack([self.weights[k] * self.likelihood(x, k) for k in range(2)])
        else:  # what the reference computes: the labels alone (see the module docstring)
            r = (1 - self.lam_r) * torch.nn.functional.one_hot(y.long(), 2).T.double()
        r = r.clamp_min(EPS_R)
        return r / (r.sum(0) + 1e-12)

    def fit(self, x: torch.Tensor, y: torch.Tensor | None = None, iters: int = 1) -> BetaMixture:
        """``iters`` EM steps on confidences x (N,) (clipped to [1e-4, 1 - 1e-4]), with
        consistency labels y (N,) 0/1 or without (unsupervised, exponential averaging)."""
        x = x.double().clamp(EPS_X, 1 - EPS_X)
        for _ in range(iters):
            r = self.responsibilities(x, y)
            fitted = [fit_beta_weighted(x, r[k]) for k in range(2)]
            if y is not None:
                self.alphas = [a for a, _ in fitted]
                self.betas = [b for _, b in fitted]
                continue
            lam = self.lam
            self.alphas = [lam * o + (1 - lam) * a for o, (a, _) in zip(self.alphas, fitted)]
            self.betas = [lam * o + (1 - lam) * b for o, (_, b) in zip(self.betas, fitted)]
            new_w = r.sum(1)
            new_w = new_w / (new_w.sum() + 1e-12)
            self.weights = [lam * o + (1 - lam) * float(n) for o, n in zip(self.weights, new_w)]
        return self

    def threshold(
        self, lo: float = 0.3, hi: float = 0.9, resolution: int = 10, zeta: float = 0.4
    ) -> float:
        """The smallest grid confidence from which on the "consistent" component wins
        (reference ``predict_proba``; see the module docstring)."""
        x = torch.linspace(lo, hi, resolution, dtype=torch.float64)
        means = [a / (a + b) for a, b in zip(self.alphas, self.betas)]
        k = int(means[1] > means[0])
        pos, neg = self.likelihood(x, k), self.likelihood(x, 1 - k)
        n = int((pos / (pos + neg) > zeta).sum())
        return float(x[min(max(0, resolution - n), resolution - 1)])


@register_policy("free_bmm")
class FreeBMMPolicy(ExitPolicy):
    """FREE's shallow-deep exit decision with an online-estimated threshold.

    threshold: the fixed threshold (before the first fit, or always with ``adaptive=False``).
    adaptive: estimate the threshold from the (confidence, consistency) pairs the decoder
        reports. zeta, lo, hi, resolution: the threshold rule; max_updates: fits at most.
    """

    param = "threshold"
    param_range = (0.0, 1.0)
    safer_when = "higher"  # for the fixed threshold (what a calibration sweep sets)
    # The early-exit decoder reports (confidence, consistency) pairs to policies with this flag.
    observes_consistency: ClassVar[bool] = True

    def __init__(
        self,
        threshold: float = 0.9,
        adaptive: bool = True,
        zeta: float = 0.4,
        lo: float = 0.3,
        hi: float = 0.9,
        resolution: int = 10,
        max_updates: int = 300,
    ) -> None:
        super().__init__(threshold=threshold, adaptive=adaptive, zeta=zeta, lo=lo, hi=hi,
                         resolution=resolution, max_updates=max_updates)
        self._check_range("zeta", zeta, (0.0, 1.0))
        self._check_range("lo", lo, (0.0, 1.0))
        self._check_range("hi", hi, (float(lo), 1.0))
        for name, v in (("resolution", resolution), ("max_updates", max_updates)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "resolution"
                                                                   else 0):
                raise ConfigError(f"free_bmm: {name} must be an int (>= 2 for resolution); "
                                  f"got {v!r}")
        self.mixture = BetaMixture()
        self.estimated: float | None = None  # the fitted threshold, once there is one
        self.updates = 0
        self._conf: list[torch.Tensor] = []
        self._consistent: list[torch.Tensor] = []

    # -- online calibration ------------------------------------------------------------------
    @property
    def num_observed(self) -> int:
        return sum(int(c.numel()) for c in self._conf)

    def observe(self, confidence: torch.Tensor, consistent: torch.Tensor) -> None:
        """Record pairs: confidence (N,) at the shallow exit, consistent (N,) bool (shallow
        argmax == deep argmax)."""
        if confidence.numel():
            self._conf.append(confidence.detach().double().cpu().flatten())
            self._consistent.append(consistent.detach().long().cpu().flatten())

    def begin_sequence(self) -> None:
        """Refit the mixture on every pair so far and move the threshold (module docstring)."""
        if not self.params["adaptive"] or not self._conf:
            return
        if self.updates >= int(self.params["max_updates"]):
            return
        x, y = torch.cat(self._conf), torch.cat(self._consistent)
        self.mixture.fit(x, y)
        p = self.params
        self.estimated = self.mixture.threshold(p["lo"], p["hi"], p["resolution"], p["zeta"])
        self.updates += 1

    @property
    def current_threshold(self) -> float:
        if self.params["adaptive"] and self.estimated is not None:
            return self.estimated
        return float(self.value)

    # -- the contract ------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: Any = "cpu") -> PolicyState:
        return {"shallow_conf": torch.full((batch_size,), -1.0, device=device)}

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        self.check_logits(logits)
        if exit_index > 0:  # past the shallow exit every row runs the deep model
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state
        conf = top2_gap(logits)
        return conf > self.current_threshold, {**state, "shallow_conf": conf}

    def grid(self, num_exits: int) -> list[float]:
        return [round(0.05 * i, 4) for i in range(21)]

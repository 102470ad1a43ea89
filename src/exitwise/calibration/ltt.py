"""Learn-then-Test (Angelopoulos et al., 2021) certification of an early-exit threshold, as in
CALM (Schuster et al., 2022).

Given, for each candidate threshold lambda, the losses L_i(lambda) in [0, 1] of n calibration
sequences (e.g. the fraction of generated tokens that differ from the full model's greedy
output, or 1 if the sequence differs at all), test H0(lambda): R(lambda) > epsilon, with R the
expected loss, by **fixed-sequence testing**: thresholds are visited from the safest (closest
to the full model) towards the most aggressive, each tested at level delta, stopping at the
first one not rejected. Every rejected threshold then has risk <= epsilon simultaneously with
probability >= 1 - delta; the most aggressive of them is returned.

p-values (for the sample mean r of n losses in [0, 1]):
- Hoeffding:          p = exp(-2 n (epsilon - r)_+^2)
- Hoeffding-Bentkus:  p = min(exp(-n h(min(r, epsilon), epsilon)),
                              e * P[Binomial(n, epsilon) <= ceil(n r)])
  with h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)).

    losses = early_exit_losses(lm, ids, mask, "calm_softmax", thresholds, max_new_tokens=32)
    result = certify_threshold(losses, epsilon=0.1, delta=0.1)
    result.threshold    # most aggressive certified threshold (None: none certified)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError, InputError
from ..generation import DECODING_STRATEGIES, generate
from ..policies import get_policy

METHODS = ("hoeffding", "hoeffding_bentkus")
ORDERS = ("descending", "ascending", "given")


class CalibrationRefused(InputError):
    """The calibration set is too small for any threshold to be certified."""


@dataclass
class LTTResult:
    """threshold: the most aggressive certified threshold, or None (see ``reason``).
    certified: every certified threshold, safest first. p_values / risks: per tested threshold
    (in testing order; untested ones are absent)."""

    threshold: float | None
    certified: list[float]
    p_values: dict[float, float]
    risks: dict[float, float]
    n: int
    epsilon: float
    delta: float
    method: str
    reason: str = ""
    order: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _sequences_needed(epsilon: float, delta: float, method: str) -> int:
    """The fewest sequences whose zero-loss p-value under ``method`` is at most ``delta`` (the
    p-value falls as n grows: doubling, then bisection)."""
    hi = 1
    while p_value(0.0, hi, epsilon, method) > delta:
        hi *= 2
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if p_value(0.0, mid, epsilon, method) <= delta:
            hi = mid
        else:
            lo = mid + 1
    return lo


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[Binomial(n, p) <= k], summed in log space."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p
        + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _h1(a: float, b: float) -> float:
    left = a * math.log(a / b) if a > 0 else 0.0
    right = (1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0
    return left + right


def hoeffding_p_value(risk: float, n: int, epsilon: float) -> float:
    """p-value of H0: R > epsilon from the mean loss ``risk`` of n losses in [0, 1]."""
    return math.exp(-2.0 * n * max(epsilon - risk, 0.0) ** 2)


def hoeffding_bentkus_p_value(risk: float, n: int, epsilon: float) -> float:
    """The tighter Hoeffding-Bentkus p-value (LTT's default)."""
    hoeff = math.exp(-n * _h1(min(risk, epsilon), epsilon))
    bentkus = math.e * binomial_cdf(math.ceil(n * risk - 1e-9), n, epsilon)
    return min(1.0, hoeff, bentkus)


def p_value(risk: float, n: int, epsilon: float, method: str = "hoeffding_bentkus") -> float:
    if method not in METHODS:
        raise ConfigError(f"unknown p-value method {method!r}; choose from {', '.join(METHODS)}")
    fn = hoeffding_p_value if method == "hoeffding" else hoeffding_bentkus_p_value
    return fn(risk, n, epsilon)


def certify_threshold(
    losses_by_threshold: Mapping[float, Sequence[float] | torch.Tensor],
    epsilon: float,
    delta: float,
    method: str = "hoeffding_bentkus",
    order: str = "descending",
) -> LTTResult:
    """Most aggressive threshold whose risk is certified <= epsilon at level delta.

    losses_by_threshold: threshold -> n per-sequence losses in [0, 1] (same n for all).
    order: how to go from safest to most aggressive: "descending" (higher threshold = safer,
        the CALM policies), "ascending", or "given" (the mapping's own order, safest first).
    Raises CalibrationRefused when n is so small that even zero observed loss could not be
    certified; returns ``threshold=None`` with a reason when the data certify none.
    """
    if not 0.0 < float(epsilon) < 1.0:
        raise ConfigError(f"epsilon must be in (0, 1); got {epsilon!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ConfigError(f"delta must be in (0, 1); got {delta!r}")
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    if method not in METHODS:
        raise ConfigError(f"unknown p-value method {method!r}; choose from {', '.join(METHODS)}")
    if not losses_by_threshold:
        raise InputError("losses_by_threshold is empty: give losses for at least one threshold")
    risks: dict[float, float] = {}
    n = None
    for lam, losses in losses_by_threshold.items():
        values = torch.as_tensor(losses, dtype=torch.float64).flatten()
        if values.numel() == 0:
            raise InputError(f"threshold {lam}: no losses")
        if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
            raise InputError(f"threshold {lam}: losses must be finite and in [0, 1]")
        if n is not None and values.numel() != n:
            raise InputError(
                f"every threshold needs losses on the same n sequences; got {n} and "
                f"{values.numel()} (threshold {lam})"
            )
        n = values.numel()
        risks[float(lam)] = float(values.mean())
    assert n is not None
    best_p = p_value(0.0, n, float(epsilon), method)
    if best_p > delta:
        need = _sequences_needed(float(epsilon), float(delta), method)
        raise CalibrationRefused(
            f"{n} calibration sequences are too few: even with zero observed loss the "
            f"{method} p-value is {best_p:.3g} > delta={delta}, so no threshold can be "
            f"certified at risk <= {epsilon}; give at least {need} sequences ({method}) or "
            "relax epsilon / delta"
        )
    keys = list(risks)
    if order != "given":
        keys = sorted(keys, reverse=order == "descending")
    result = LTTResult(None, [], {}, {}, n, float(epsilon), float(delta), method, order=keys)
    for lam in keys:  # fixed-sequence testing: stop at the first failure
        p = p_value(risks[lam], n, float(epsilon), method)
        result.p_values[lam] = p
        result.risks[lam] = risks[lam]
        if p > delta:
            break
        result.certified.append(lam)
    if result.certified:
        result.threshold = result.certified[-1]
    else:
        first = keys[0]
        result.reason = (
            f"the safest threshold {first} has observed risk {risks[first]:.3g} and p-value "
            f"{result.p_values[first]:.3g} > delta={delta}: no threshold is certified"
        )
    return result


def sequence_losses(
    candidate: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], kind: str = "token"
) -> list[float]:
    """Per-row losses of generated token lists ``candidate`` vs ``reference``.

    kind "token": fraction of positions (over the longer of the two) that differ, a missing
    or extra token counting as a difference; "sequence": 1.0 if anything differs.
    """
    if kind not in ("token", "sequence"):
        raise ConfigError(f"loss kind must be 'token' or 'sequence'; got {kind!r}")
    if len(candidate) != len(reference):
        raise InputError(f"{len(candidate)} candidate rows but {len(reference)} reference rows")
    out = []
    for cand, ref in zip(candidate, reference):
        width = max(len(cand), len(ref))
        diff = sum(
            i >= len(cand) or i >= len(ref) or cand[i] != ref[i] for i in range(width)
        )
        out.append(diff / width if kind == "token" and width else float(diff > 0))
    return out


def _generated(output: Any, prompt_len: int) -> list[list[int]]:
    """Each row's generated tokens (B lists) from a GenerateOutput."""
    rows = output.sequences[:, prompt_len:].tolist()
    return [row[:n] for row, n in zip(rows, output.stats.new_tokens)]


def early_exit_losses(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    policy: str,
    thresholds: Sequence[float],
    max_new_tokens: int = 32,
    kv: str = "skip",
    kind: str = "token",
    policy_params: Mapping[str, Any] | None = None,
    **generate_kwargs: Any,
) -> dict[float, list[float]]:
    """threshold -> per-prompt losses of early-exit decoding vs plain greedy decoding.

    input_ids / attention_mask: (n, T) calibration prompts (left-padded), decoded as one batch.
    ``policy``: a registered policy name whose tuned parameter is the threshold;
    ``policy_params``: its other parameters (e.g. tau, horizon). ``kv``: the KV mode decoding
    will run with (the tokens, and so the losses, depend on it; default "skip", as
    ``generate``'s). ``generate_kwargs`` go to :func:`exitwise.generation.generate`
    (eos_token_id, exit_layers, ...).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    base = get_policy(policy, **dict(policy_params or {}))
    common = dict(max_new_tokens=max_new_tokens, **generate_kwargs)
    t = input_ids.shape[1]
    # the reference is plain greedy decoding: early exit's own options (exit_layers ...)
    # are not its to take
    own = DECODING_STRATEGIES.get("early_exit").option_names()
    plain = {k: v for k, v in common.items()
             if k not in own or k in DECODING_STRATEGIES.get("greedy").option_names()}
    ref = _generated(generate(model, input_ids, attention_mask, strategy="greedy", **plain), t)
    out: dict[float, list[float]] = {}
    for lam in thresholds:
        got = generate(
            model, input_ids, attention_mask, strategy="early_exit", policy=base.with_param(lam),
            kv=kv, **common,
        )
        out[float(lam)] = sequence_losses(_generated(got, t), ref, kind)
    return out

"""Per-exit temperature scaling (Guo et al., 2017) fitted on a held-out exit-logits cache.

Each exit k gets one scalar T_k > 0 minimising the held-out negative log-likelihood of
``softmax(logits_k / T_k)``. Temperature does not change any exit's argmax, only its
confidence, which is what confidence- and entropy-based exit policies read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from ..analysis.cache import ExitLogitsCache
from ..errors import ConfigError, InputError
from ..temperatures import temperature_list

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels))


def _fit_one(
    logits: torch.Tensor, labels: torch.Tensor, lo: float, hi: float, max_iter: int
) -> float:
    """T minimising NLL of (N, C) logits; optimises log T with LBFGS, clamped to [lo, hi]."""
    x = logits.double()
    log_lo, log_hi = math.log(lo), math.log(hi)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # Clamping inside the loss keeps a run-away line search from overflowing exp().
        loss = F.cross_entropy(x / log_t.clamp(log_lo, log_hi).exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    value = float(log_t.detach())
    t = math.exp(min(max(value, log_lo), log_hi)) if math.isfinite(value) else 1.0
    # Never return something worse than no scaling (guards a failed line search).
    return t if _nll(logits, labels, t) <= _nll(logits, labels, 1.0) else 1.0


def fit_temperatures(
    cache: ExitLogitsCache,
    min_temperature: float = MIN_TEMPERATURE,
    max_temperature: float = MAX_TEMPERATURE,
    max_iter: int = 100,
) -> torch.Tensor:
    """(E,) float32 per-exit temperatures minimising held-out NLL.

    ``cache`` must be held-out data (not the training set, not the evaluation split) with
    every label known. Raises :class:`InputError` on an empty cache, NaN logits or missing
    labels, :class:`ConfigError` on a bad range.
    """
    if not 0 < min_temperature < max_temperature < math.inf:
        raise ConfigError(
            f"need 0 < min_temperature < max_temperature; got {min_temperature}, {max_temperature}"
        )
    cache.check(need_labels=True)
    if cache.task == "regression":
        raise ConfigError(
            "temperature scaling calibrates class probabilities; a regression model (one "
            "output) has none: leave its temperatures at 1"
        )
    temps = [
        _fit_one(cache.logits[:, k], cache.labels, min_temperature, max_temperature, max_iter)
        for k in range(cache.num_exits)
    ]
    return torch.tensor(temps, dtype=torch.float32)


def apply_temperatures(
    model: "MultiExitModel", temperatures: torch.Tensor | Sequence[float]
) -> None:
    """Copy (E,) temperatures into ``model.temperatures`` (used by the runtime executor),
    kept in float32 also in a half-precision model (a bf16 copy would round them). A
    regression model's output is a value, not logits: only temperatures of 1 apply to it."""
    temps = torch.tensor(temperature_list(temperatures, model.num_exits), dtype=torch.float32)
    if model.task == "regression" and bool((temps != 1.0).any()):
        raise ConfigError("a regression model predicts a value, which has no temperature "
                          f"to scale; got temperatures {temps.tolist()}")
    with torch.no_grad():
        model.temperatures = temps.to(model.temperatures.device)


def expected_calibration_error(
    logits: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> float:
    """ECE of (N, C) logits against (N,) labels with ``bins`` equal-width confidence bins:
    sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    if bins < 1:
        raise ConfigError(f"bins must be >= 1, got {bins}")
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).long()
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise InputError(
            f"need (N, C) logits and (N,) labels; got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise InputError("no rows to measure calibration on")
    if not bool(torch.isfinite(logits).all()):
        raise InputError("logits contain NaN or inf")
    probs = torch.softmax(logits.double(), dim=-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur.
    which = (conf * bins).ceil().long().clamp(1, bins) - 1
    ece = 0.0
    n = logits.shape[0]
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        if count:
            gap = abs(float(correct[inside].mean()) - float(conf[inside].mean()))
            ece += count / n * gap
    return ece


def calibration_report(
    cache: ExitLogitsCache, temperatures: torch.Tensor | Sequence[float], bins: int = 15
) -> list[dict[str, Any]]:
    """Per exit: NLL and ECE before (T = 1) and after scaling by ``temperatures``."""
    cache.check(need_labels=True)
    if cache.task == "regression":
        raise ConfigError("NLL and ECE measure class probabilities; a regression cache has "
                          "none (and no temperatures)")
    temps = temperature_list(temperatures, cache.num_exits)
    report = []
    for k, t in enumerate(temps):
        raw = cache.logits[:, k]
        report.append(
            {
                "exit": k,
                "layer": cache.exit_layers[k],
                "temperature": t,
                "nll_before": _nll(raw, cache.labels, 1.0),
                "nll_after": _nll(raw, cache.labels, t),
                "ece_before": expected_calibration_error(raw, cache.labels, bins),
                "ece_after": expected_calibration_error(raw / t, cache.labels, bins),
            }
        )
    return report

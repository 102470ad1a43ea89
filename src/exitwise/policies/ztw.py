"""``ztw``: Zero Time Waste's ensemble confidence (Wołczyk et al., NeurIPS 2021).

At exit k the prediction is a weighted *geometric* ensemble of every exit seen so far:

    p̃_k(x) ∝ exp(b_k) · Π_{j<=k} p_j(x) ^ w_kj        (elementwise over the C classes)

i.e. in log space ``s_k = b_k + Σ_j w_kj · log p_j`` and ``p̃_k = softmax(s_k)``. A row exits
when ``max p̃_k >= threshold``. ``w_kj >= 0`` and ``b_k`` are learned by the ZTW training
recipe; the defaults (``w = 1``, ``b = 0``) give the plain product of experts over every exit.

ZTW ensembles the internal classifiers only: the backbone's own final head is not part of the
ensemble (reference: ``gmum/Zero-Time-Waste`` ``ztw_cv/architectures/early_exits/ztw.py``,
``ZTWEnsembling``). Weights (and biases) with one row fewer than the model has exits say just
that: the exits they cover are ensembled, the final exit returns its own prediction
(``log_softmax`` of its logits). :meth:`exitwise.heads.GeometricEnsemble.to_dict` writes such
rows.

Weight format (JSON-able, what the recipe writes):

* ``weights = [[w_00], [w_10, w_11], ...]``: row k has k+1 entries, one per exit j <= k; a
  square K x K matrix with zeros above the diagonal (what
  :meth:`exitwise.heads.cascade.GeometricEnsemble.to_dict` writes) is accepted and trimmed;
* ``biases = [b_0, b_1, ...]``: one entry per exit, either a list of C per-class values (ZTW's
  b_k is a vector over classes) or one number. Note that a single number per exit adds the
  same constant to every class and cancels in the softmax: only per-class biases change the
  prediction. ``None`` means zeros. ``bias=`` is accepted as another name for it, so
  ``get_policy("ztw", threshold=t, **model.ensemble.to_dict())`` works.

Per-row state: ``logp`` (B, k, C), the log-probabilities of the k exits already seen (the
executor calls ``decide`` at every exit in order, so row r's history is exactly its own).

A row that leaves returns the ensemble's log-probabilities at its exit
(:meth:`ZTWPolicy.output_logits`, from the state before ``decide``): the executor, the offline
replay (``ReplayResult.outputs``) and the ONNX runner all call it, so predictions and accuracy
are the ensemble's. :func:`ztw_ensemble` / :func:`ztw_cache` compute the same offline for a
whole cache. The weights apply to the logits as the executor passes them (divided by the
model's temperatures); a learned ensemble was fitted on raw logits, so run it with
temperatures of 1.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import ConfigError, InputError
from ..temperatures import temperature_list
from .base import ExitPolicy, PolicyState, register_policy

Weights = list[list[float]] | None
Biases = list[float | list[float]] | None


def _finite(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"ztw: {what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"ztw: {what} must be finite, got {value!r}")
    return v


def triangular(weights: Any) -> Any:
    """Trim a square K x K weight matrix (zeros above the diagonal) to the triangular
    ``[[w_00], [w_10, w_11], ...]`` form; anything else is returned unchanged (and checked by
    :func:`check_ztw_weights`)."""
    if not isinstance(weights, (list, tuple)) or not weights:
        return weights
    k = len(weights)
    rows = [r for r in weights if isinstance(r, (list, tuple))]
    if len(rows) != k or any(len(r) != k for r in rows) or k == 1:
        return weights
    above = [rows[i][j] for i in range(k) for j in range(i + 1, k)]
    try:
        nonzero = any(float(v) != 0.0 for v in above)
    except (TypeError, ValueError):
        return weights
    if nonzero:
        raise ConfigError("ztw: a square weight matrix must be zero above the diagonal "
                          "(exit k can only weigh exits j <= k)")
    return [list(rows[i][: i + 1]) for i in range(k)]


def check_ztw_weights(weights: Weights, biases: Biases) -> None:
    """Raise :class:`ConfigError` unless ``weights`` is triangular and ``biases`` is one entry
    (a number or a per-class list) per exit, all finite; both may be None."""
    if weights is not None:
        if not isinstance(weights, (list, tuple)) or not weights:
            raise ConfigError("ztw: weights must be a non-empty list of per-exit lists")
        for k, row in enumerate(weights):
            if not isinstance(row, (list, tuple)) or len(row) != k + 1:
                raise ConfigError(
                    f"ztw: weights[{k}] must list {k + 1} values (one per exit j <= {k}); "
                    f"got {row!r}"
                )
            for j, w in enumerate(row):
                _finite(w, f"weights[{k}][{j}]")
    if biases is not None:
        if not isinstance(biases, (list, tuple)) or not biases:
            raise ConfigError("ztw: biases must be a non-empty list, one entry per exit")
        if weights is not None and len(biases) != len(weights):
            raise ConfigError(f"ztw: {len(biases)} biases for {len(weights)} weight rows")
        sizes = set()
        for k, b in enumerate(biases):
            if isinstance(b, (list, tuple)):
                sizes.add(len(b))
                for c, v in enumerate(b):
                    _finite(v, f"biases[{k}][{c}]")
            else:
                _finite(b, f"biases[{k}]")
        if len(sizes) > 1:
            raise ConfigError("ztw: per-class biases must all have the same length")


def covered_exits(weights: Weights, biases: Biases) -> int | None:
    """How many exits (the first ones) the ensemble rows cover; None: every exit."""
    if weights is not None:
        return len(weights)
    return None if biases is None else len(biases)


def ensemble_scores(
    exit_index: int, logp: torch.Tensor, weights: Weights, biases: Biases
) -> torch.Tensor:
    """Unnormalised ensemble log-scores at ``exit_index``.

    logp: (B, k+1, C) float32 log-probabilities of exits 0..k. Returns (B, C)
    ``b_k + Σ_j w_kj · logp[:, j]``; at the one exit just past the rows (ZTW's final exit,
    outside the ensemble) the exit's own log-probabilities ``logp[:, k]``.
    """
    k = exit_index
    n_seen, num_classes = int(logp.shape[1]), int(logp.shape[2])
    if n_seen != k + 1:
        raise InputError(f"ztw: exit {k} needs the log-probs of {k + 1} exits, got {n_seen}")
    if covered_exits(weights, biases) == k:
        return logp[:, k]
    if weights is None:
        scores = logp.sum(1)
    else:
        if k >= len(weights):
            raise ConfigError(f"ztw: weights cover {len(weights)} exits, exit {k} has none")
        w = torch.tensor(weights[k], dtype=logp.dtype, device=logp.device)
        scores = (logp * w.view(1, -1, 1)).sum(1)
    if biases is not None:
        if k >= len(biases):
            raise ConfigError(f"ztw: biases cover {len(biases)} exits, exit {k} has none")
        b = torch.as_tensor(biases[k], dtype=logp.dtype, device=logp.device)
        if b.dim() == 1 and b.numel() != num_classes:
            raise InputError(f"ztw: biases[{k}] has {b.numel()} classes, logits have {num_classes}")
        scores = scores + b
    return scores


@register_policy("ztw")
class ZTWPolicy(ExitPolicy):
    """Exit when the geometric ensemble of the exits so far is confident enough."""

    param = "threshold"
    safer_when = "higher"
    param_range = (0.0, 1.0)

    def __init__(
        self,
        threshold: float = 0.9,
        weights: Weights = None,
        biases: Biases = None,
        bias: Biases = None,
    ) -> None:
        if bias is not None:
            if biases is not None:
                raise ConfigError("ztw: give biases or bias, not both")
            biases = bias
        weights = triangular(weights)
        check_ztw_weights(weights, biases)
        weights = None if weights is None else [[float(w) for w in row] for row in weights]
        if biases is not None:
            biases = [
                [float(v) for v in b] if isinstance(b, (list, tuple)) else float(b) for b in biases
            ]
        super().__init__(threshold=threshold, weights=weights, biases=biases)

    def _check_exits(self, num_exits: int) -> None:
        covered = covered_exits(self.params["weights"], self.params["biases"])
        if covered is not None and covered not in (num_exits, num_exits - 1):
            raise ConfigError(f"ztw: weights were set for {covered} exits, the model has "
                              f"{num_exits} (give one row per exit, or per exit but the final "
                              "one, which then keeps its own prediction)")

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> PolicyState:
        # The class count is unknown until the first logits arrive: start with zero exits.
        return {"logp": torch.zeros(batch_size, 0, 0, device=device)}

    def _history(self, logits: torch.Tensor, state: PolicyState) -> torch.Tensor:
        """(B, k+1, C): the state's log-probs with this exit's appended."""
        logp = torch.log_softmax(logits.float(), dim=-1).unsqueeze(1)
        seen = state["logp"]
        return logp if seen.shape[1] == 0 else torch.cat([seen, logp], dim=1)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        self._check_exits(num_exits)
        history = self._history(logits, state)
        scores = ensemble_scores(exit_index, history, self.params["weights"],
                                 self.params["biases"])
        confidence = torch.softmax(scores, dim=-1).amax(-1)
        return confidence >= self.value, {"logp": history}

    def output_logits(
        self, exit_index: int, num_exits: int, logits: torch.Tensor, state: PolicyState
    ) -> torch.Tensor:
        """(B, C) the ensemble's log-probabilities at ``exit_index`` for rows with the state
        they had *before* this exit's ``decide`` (also valid at the last exit, where the
        executor decides nothing)."""
        self._check_exits(num_exits)
        scores = ensemble_scores(exit_index, self._history(logits, state),
                                 self.params["weights"], self.params["biases"])
        return torch.log_softmax(scores, dim=-1)

    def grid(self, num_exits: int) -> list[float]:
        # A product of k experts is sharp, so most of the action is close to 1.
        return [round(0.5 + 0.005 * i, 4) for i in range(100)] + [0.9975, 0.999, 0.9999, 1.0]


def ztw_ensemble(
    logits: torch.Tensor,
    weights: Weights = None,
    biases: Biases = None,
    temperatures: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Every exit's ensemble log-probabilities for cached logits.

    logits: (N, E, C) raw exit logits (as in :class:`~exitwise.analysis.ExitLogitsCache`);
    temperatures: (E,) per-exit temperatures applied first, as the executor does (None = 1).
    Returns (N, E, C) float32: entry k is ``log p̃_k``, the ensemble of exits 0..k (with rows
    for E - 1 exits, the last entry is the final exit's own log-probabilities).
    """
    if logits.dim() != 3:
        raise InputError(f"ztw_ensemble needs (N, E, C) logits, got {tuple(logits.shape)}")
    weights = triangular(weights)
    check_ztw_weights(weights, biases)
    num_exits = int(logits.shape[1])
    covered = covered_exits(weights, biases)
    if covered is not None and covered not in (num_exits, num_exits - 1):
        raise ConfigError(f"ztw: weights were set for {covered} exits, logits have "
                          f"{num_exits}")
    scaled = logits.float()
    if temperatures is not None:
        temps = temperature_list(temperatures, num_exits)
        scaled = torch.stack(
            [scaled[:, k] / t if t != 1.0 else scaled[:, k] for k, t in enumerate(temps)], 1
        )
    logp = torch.log_softmax(scaled, dim=-1)
    out = [
        torch.log_softmax(ensemble_scores(k, logp[:, : k + 1], weights, biases), dim=-1)
        for k in range(num_exits)
    ]
    return torch.stack(out, dim=1)

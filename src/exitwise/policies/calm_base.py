"""Shared pieces of the CALM token-level exit policies (Schuster et al., 2022).

A CALM policy scores each row at an exit with a confidence ``c`` in [0, 1] and exits when
``c > lambda_t``, where the threshold decays with the generated position t (the paper's
decaying threshold)::

    lambda_t = clip_[0, 1](0.9 * lambda + 0.1 * exp(-tau * t / N))

lambda is the tuned ``threshold``, ``tau`` (>= 0) the decay rate (4 by default, the authors'
``position_temp``) and ``N`` (``horizon``, > 0) the length scale (CALM uses the maximum output
length; by default the decoder passes ``max_new_tokens``). Early tokens, which condition
everything after them, need more confidence. Note that with ``tau > 0`` even ``threshold=1``
decays towards 0.9 as t grows: use ``threshold=1, tau=0`` (or the ``never`` policy) for a
never-exit reference.

The measures (one registered policy each): ``calm_softmax`` CALM's *softmax response*, the gap
between the two largest softmax probabilities (``calm_top2`` is an alias of it);
``calm_maxprob`` the largest probability alone; ``calm_saturation`` the cosine similarity of
consecutive hidden states; ``calm_learned`` a trained consistency classifier.

Deviations from the authors' code (t5x ``t5x/contrib/calm/models.py``,
``EncoderDecoderModel._compute_logits_from_slice_early_exit``):

- the decay follows the paper's formula above; the code computes
  ``lambda * exp(-tau t / N) / 10 + 9 lambda / 10`` (the decaying term scaled by lambda);
- decisions are per row; the code leaves the layer loop once the *minimum* confidence of the
  batch passes the threshold, and exits when ``c >= lambda_t`` (here ``c > lambda_t``, the
  paper's strict rule);
- its ``min_exit`` (no exit below a given layer) is the decoder's ``exit_layers`` here.

State (dict of (B, ...) tensors, see :class:`~exitwise.policies.base.ExitPolicy`):
    t:        (B,) float, tokens the row has already generated (0 when absent).
    horizon:  (B,) float, N when the policy's own ``horizon`` is None (1 when absent).
    hidden / prev_hidden: (B, H), set by the decoder for policies with ``needs_hidden``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState


def decayed_threshold(
    threshold: float, t: torch.Tensor, horizon: torch.Tensor | float, tau: float
) -> torch.Tensor:
    """CALM's lambda_t = clip(0.9 lambda + 0.1 exp(-tau t / N), 0, 1); t (B,) -> (B,)."""
    return (0.9 * threshold + 0.1 * torch.exp(-tau * t / horizon)).clamp(0.0, 1.0)


def softmax_max(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 softmax probability: (B, V) -> (B,)."""
    return torch.softmax(logits.float(), -1).amax(-1)


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """CALM's softmax response p1 - p2, the difference of the two largest softmax
    probabilities (t5x ``get_pred_confidence``, ``conf_method='softmax_diff'``): (B, V) ->
    (B,). A single class has no runner-up: its gap is its probability, 1."""
    if logits.shape[-1] < 2:
        return torch.ones(logits.shape[:-1], device=logits.device)
    top = torch.softmax(logits.float(), -1).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def cosine_saturation(hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the hidden states at this exit and the previous one (B, H) -> (B,),
    clamped to [-1, 1] so float round-off never exceeds a threshold of 1."""
    cos = torch.nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)
    return cos.clamp(-1.0, 1.0)


class CalmPolicy(ExitPolicy):
    """Base of ``calm_softmax`` (alias ``calm_top2``), ``calm_maxprob``, ``calm_saturation``
    and ``calm_learned``; subclasses define :meth:`measure` ((B, V) logits -> (B,) score)."""

    param = "threshold"
    param_range = (0.0, 1.0)
    safer_when = "higher"  # lambda_t grows with lambda: fewer exits
    needs_hidden: ClassVar[bool] = False

    def __init__(
        self, threshold: float = 0.9, tau: float = 4.0, horizon: float | None = None
    ) -> None:
        super().__init__(threshold=threshold, tau=tau, horizon=horizon)
        self._check_range("tau", tau, (0.0, math.inf))
        if horizon is not None:
            self._check_range("horizon", horizon, (0.0, math.inf))
            if float(horizon) <= 0:
                raise ConfigError(f"{self.registered_name}: horizon (N) must be > 0; got {horizon}")

    def measure(self, logits: torch.Tensor, state: PolicyState) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def threshold_at(self, state: PolicyState, batch: int, device: Any) -> torch.Tensor:
        """(B,) lambda_t for each row's generated position."""
        t = state.get("t")
        t = torch.zeros(batch, device=device) if t is None else t.float()
        if self.params["horizon"] is not None:
            horizon: torch.Tensor | float = float(self.params["horizon"])
        else:
            h = state.get("horizon")
            horizon = 1.0 if h is None else h.float().clamp(min=1e-9)
        return decayed_threshold(float(self.value), t, horizon, float(self.params["tau"]))

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        self.check_logits(logits)
        score = self.measure(logits, state)
        lam = self.threshold_at(state, logits.shape[0], logits.device)
        return score > lam, self.next_state(state)

    def next_state(self, state: PolicyState) -> PolicyState:
        return state

    def grid(self, num_exits: int) -> list[float]:
        return [round(0.05 * i, 4) for i in range(21)]

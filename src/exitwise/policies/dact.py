"""``dact``: DACT's accumulated answer and halting rule (Eyzaguirre & Soto, CVPR 2020,
"Differentiable Adaptive Computation Time for Visual Reasoning", sec. 3; applied to BERT by
DACT-BERT, Eyzaguirre, del Río, Araujo & Soto, 2021, sec. 3).

Exit n (1-based, of N) gives class probabilities ``y_n = softmax(z_n)`` and a halting value
``h_n`` in (0, 1) (the ``dact`` exit scorer, :mod:`exitwise.heads.dact`). DACT keeps

    a_0 = 0,  p_0 = 1
    a_n = p_{n-1} * y_n + (1 - p_{n-1}) * a_{n-1}      (the accumulated answer, (B, C))
    p_n = h_n * p_{n-1}                                (the mass later exits still get)

so ``a_n`` is a convex mixture of the exits' distributions and a row whose ``p`` has shrunk
stops changing. With ``d = N - n`` exits to go, the final answer satisfies
``a_N[c] >= a_n[c] (1 - p_n)^d`` and ``a_N[c] <= a_n[c] + d p_n`` for every class c, so the
arg-max can no longer change once

    a_n[c*] (1 - p_n)^d - a_n[c2] - d p_n > 0          (c*, c2: the top two classes of a_n)

and the row halts there, returning ``a_n``. Reference: ``DACTWrapper.forward`` in
ceyzaguirre4/DACT-MAC (``model.py``: ``y = y_n * h + y * (1 - h)``, ``h = h_n * h``, and the
test ``best * (1 - h) ** remaining_iters - runner_up - h * remaining_iters > 0``).

The tuned parameter ``margin`` (default 0: the paper's rule, which the paper has no knob for)
is added to the right-hand side: a row halts when the left-hand side exceeds ``margin``.
Negative margins halt earlier, where later exits could still change the answer by a bounded
amount (a speed/accuracy trade-off for calibration); positive ones halt later than the
guarantee needs (the prediction is the same as at 0, only the returned probabilities differ);
``margin = 1`` never halts early.

Per-row state (batch on dim 0): ``accumulated`` (B, C) ``a_{n-1}`` ((B, 0) before the first
exit, the class count being unknown until then) and ``remaining`` (B,) ``p_{n-1}``. A row that
leaves returns ``log a_n`` (:meth:`DACTPolicy.output_logits`, as ``ztw`` returns its
ensemble's log-probabilities): ``a_n`` needs only ``p_{n-1}``, the state before this exit's
decision, so the executor and the replay return the same accumulated answer, also at the last
exit, where no decision is taken.

The exits' logits are the executor's (divided by the model's temperatures); DACT trains on raw
logits, so run a model trained with the ``dact`` strategy with temperatures of 1 to follow the
paper. Classification only: the rule compares the top two classes of a distribution.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..errors import InputError
from .base import ExitPolicy, PolicyState, register_policy

# Smallest positive float32: log() of an accumulated probability that underflowed to 0.
_TINY = torch.finfo(torch.float32).tiny


def accumulate(
    probs: torch.Tensor, previous: torch.Tensor, remaining: torch.Tensor
) -> torch.Tensor:
    """DACT's ``a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1}``.

    probs: (B, C) ``y_n``; previous: (B, C) ``a_{n-1}``, or (B, 0) for "nothing yet" (read as
    zeros); remaining: (B,) ``p_{n-1}``. Returns (B, C).
    """
    p = remaining.unsqueeze(-1).to(probs.dtype)
    if previous.shape[-1] == 0:
        return p * probs
    return p * probs + (1.0 - p) * previous.to(probs.dtype)


def halting_gap(accumulated: torch.Tensor, remaining: torch.Tensor,
                steps_left: int) -> torch.Tensor:
    """(B,) ``a[c*] (1 - p)^d - a[c2] - d p``: positive when exits still to come cannot change
    the arg-max of ``accumulated`` (B, C >= 2) any more; ``remaining`` (B,) is ``p_n`` after
    this exit and ``steps_left`` the number ``d`` of exits after it."""
    if accumulated.shape[-1] < 2:
        raise InputError("dact compares the top two classes of the accumulated answer; it needs "
                         f"at least 2 classes, got {accumulated.shape[-1]}")
    top2 = accumulated.topk(2, dim=-1).values
    d = float(steps_left)
    p = remaining.to(accumulated.dtype)
    return top2[:, 0] * (1.0 - p) ** d - top2[:, 1] - d * p


@register_policy("dact")
class DACTPolicy(ExitPolicy):
    """Halt when the remaining mass can no longer change the accumulated answer's arg-max."""

    param = "margin"
    safer_when = "higher"
    # The gap is below 1 (a probability minus non-negative terms): margin 1 never halts early.
    param_range = (-math.inf, 1.0)
    uses_scores: ClassVar[bool] = True
    scorer: ClassVar[str | None] = "dact"
    scorer_strategy: ClassVar[str | None] = "dact"

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__(margin=margin)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> PolicyState:
        return {"accumulated": torch.zeros(batch_size, 0, device=device),
                "remaining": torch.ones(batch_size, device=device)}

    @staticmethod
    def _answer(logits: torch.Tensor, state: PolicyState) -> torch.Tensor:
        """(B, C) float32 ``a_n`` from exit n's logits and the state before exit n."""
        return accumulate(torch.softmax(logits.float(), dim=-1), state["accumulated"],
                          state["remaining"])

    def decide(self, exit_index, num_exits, logits, state, labels=None, scores=None):
        if scores is None or scores.shape != (logits.shape[0],):
            raise InputError("the dact policy needs (batch,) halting values (scores=...) from a "
                             "model with the dact exit scorer (train it with the dact strategy)")
        answer = self._answer(logits, state)
        remaining = state["remaining"] * scores.to(state["remaining"].dtype)
        gap = halting_gap(answer, remaining, num_exits - 1 - exit_index)
        return gap > float(self.value), {"accumulated": answer, "remaining": remaining}

    def output_logits(
        self, exit_index: int, num_exits: int, logits: torch.Tensor, state: PolicyState
    ) -> torch.Tensor:
        """(B, C) ``log a_n``, the accumulated answer at this exit as log-probabilities."""
        return torch.log(self._answer(logits, state).clamp_min(_TINY))

    def grid(self, num_exits: int) -> list[float]:
        # 0 is the paper's rule; below it, finer near 0 (small relaxations), then whole steps
        # down to the most the gap can fall short by (about the number of exits to go).
        fine = [-0.001, -0.002, -0.005, -0.01, -0.02, -0.03, -0.05, -0.075]
        mid = [-round(0.1 * i, 2) for i in range(1, 10)]
        coarse = [-(1.0 + 0.25 * i) for i in range(4 * max(num_exits - 1, 1) + 1)]
        return sorted(set(fine + mid + coarse + [0.0, 0.05, 0.2, 0.5, 1.0]))

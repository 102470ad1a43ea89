"""``dact``: DACT-BERT's training (Eyzaguirre, del Río, Araujo & Soto, 2021, "DACT-BERT:
Differentiable Adaptive Computation Time for an Efficient BERT Inference", sec. 3), with the
DACT mechanism of Eyzaguirre & Soto (CVPR 2020, sec. 3).

One stage: the backbone, every exit head and the halting units (the ``dact`` exit scorer,
:mod:`exitwise.heads.dact`) train together on

    L = NLL(log a_N, y) + tau * sum_{n=1..N} p_n            (batch mean)

where ``a_N`` is the accumulated answer after the last exit and ``p_n = h_1 ... h_n`` the
remaining mass after exit n (the recurrences are in :mod:`exitwise.policies.dact`, shared with
the ``dact`` exit policy, so training and inference accumulate the same way). The exits are not
trained one by one: only the accumulated answer is. Every exit runs during training (the
reference's ``HALT_TRAIN = False``); the ``dact`` policy halts at inference.

Reference: ceyzaguirre4/DACT-MAC, ``DACTWrapper.forward`` (``model.py``: the accumulation and
the ``'unit'`` ponder cost ``MIN_PENALTY + sum_n h``, where its ``h`` is our ``p_n``, the last
step's included) and ``train.py`` (``NLLLoss`` on ``log(output.clamp(min=1e-8))`` plus
``PENALTY_COEF * mean(ponder_cost)``; one optimizer and learning rate for everything,
``GATE_LR = 0``). ``tau`` defaults to the reference's ``PENALTY_COEF = 1e-3``; larger values
trade accuracy for earlier halting.

Deviations: the authors' DACT-BERT code was not found; DACT-MAC's is followed. The ponder cost's
constant ``MIN_PENALTY`` (1) is left out (it moves the loss value, not the gradient). The last
exit's halting value only enters the ponder cost (``a_N`` uses ``p_{N-1}``), as in the
reference.

Classification only: DACT accumulates class distributions and halts on the gap between the top
two classes; neither is defined for a regression output, and this strategy refuses one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..outputs import ExitOutputs
from ..policies.dact import accumulate
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    head_parameters,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

# The reference's floor under the accumulated probability before its log (train.py).
PROB_FLOOR = 1e-8
REGRESSION_ERROR = ("dact is a classification method: it accumulates class distributions and "
                    "halts on the gap between the top two classes, which a regression output "
                    "(num_labels=1) does not have")


def accumulated_answer(outputs: ExitOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The accumulated answer after the last exit and the remaining mass after every exit.

    outputs: every exit's raw logits (B, C) and halting values ``scores`` (B,). Returns
    ``a_N`` (B, C) float32 and ``p`` (B, E) float32 with ``p[:, n] = h_0 ... h_n``.
    """
    if outputs.scores is None:
        raise ConfigError("the dact loss needs the halting values of the model's dact exit "
                          "scorer (model.attach_scorer('dact'), done by the dact strategy)")
    if len(outputs.scores) != len(outputs.logits):
        raise ConfigError(f"{len(outputs.scores)} halting values for {len(outputs.logits)} exits")
    if outputs.logits[-1].shape[-1] < 2:
        raise ConfigError(REGRESSION_ERROR)
    first = outputs.logits[0]
    answer = first.new_zeros(first.shape[0], 0, dtype=torch.float32)
    remaining = first.new_ones(first.shape[0], dtype=torch.float32)
    masses = []
    for z, h in zip(outputs.logits, outputs.scores):
        answer = accumulate(torch.softmax(z.float(), dim=-1), answer, remaining)
        remaining = remaining * h.float()
        masses.append(remaining)
    return answer, torch.stack(masses, dim=1)


def dact_loss(tau: float):
    """``(outputs, labels) -> NLL(log a_N, labels) + tau * mean_b sum_n p_n``."""

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        answer, remaining = accumulated_answer(outputs)
        task = F.nll_loss(torch.log(answer.clamp_min(PROB_FLOOR)), labels)
        return task + tau * remaining.sum(dim=1).mean()

    return loss


@register_strategy("dact")
class DACTStrategy(TrainingStrategy):
    tunes_backbone = True
    tasks = ("classification",)

    def __init__(self, tau: float = 1e-3,
                 stage_args: Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__(stage_args)
        try:
            ok = math.isfinite(float(tau)) and float(tau) >= 0.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"dact: tau (the ponder penalty) must be a number >= 0, got {tau!r}")
        self.tau = float(tau)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.task != "classification":
            raise ConfigError(REGRESSION_ERROR)
        if model.num_exits < 2:
            raise ConfigError("dact needs at least one exit besides the final one")
        model.attach_scorer("dact")
        return [Stage(
            name="stage-1",
            trainable=lambda m: (backbone_parameters(m) + head_parameters(m)
                                 + list(m.scorer.parameters())),
            loss=dact_loss(self.tau),
        )]

    def options(self) -> dict[str, Any]:
        return {"tau": self.tau, **super().options()}

"""``berxit``: BERxiT (Xin et al., EACL 2021, "BERxiT: Early Exiting for BERT with Better
Fine-Tuning and Extension to Regression"), sec. 3.1 and 3.2.

Reference: castorini/berxit, ``BertForSequenceClassification.forward`` and ``BertEncoder`` in
``transformers/modeling_highway_bert.py`` (``train_strategy`` ``"alternate"`` and the ``-lte``
routines).

- stage 1 (``alternating``): the backbone and every exit train together, the loss alternating
  by optimizer step: on steps 0, 2, 4, ... (the first, third, ... step) the final exit's loss
  alone, on steps 1, 3, 5, ... the sum of every exit's loss, final included (reference:
  ``step_num % 2 == 0 -> loss`` else ``sum(highway_losses[:-1]) + loss``). The final
  classifier keeps most of a plain fine-tune's quality while the early exits learn.
  Cross-entropy, or MSE for a regression model.
- stage 2 (``learning-to-exit``): the model is frozen and BERxiT's learning-to-exit module
  (the ``lte`` exit scorer, one linear layer + sigmoid shared by all exits over each exit's
  pooled feature) learns to predict whether each exit is right: MSE between its certainty
  ``u_k`` and the target ``c_k``, averaged over exits and rows (the reference's ``MSELoss`` on
  the stacked (exits, batch) tensor). Targets, as the paper: ``c_k = 1`` when exit k's
  arg-max is the label, else 0; for regression ``c_k = 1 - tanh(|y_hat_k - y|)``.

Exit with the ``lte`` policy (certainty >= threshold), for classification and regression.

Deviations: the reference code trains the module towards the exit's *wrongness* (soft labels
0.01 / 0.99, or ``(y_hat - y)^2`` for regression, each mapped by ``1 - exp(-x)``) and exits when
the output is *below* a threshold; the paper's certainty targets are used here instead (same
decisions with the direction turned, other calibration of the scores). The reference's
``-lte`` routine computes the LTE loss alone; here it is a second stage on the frozen model,
so the module learns the correctness of the predictions the model will exit with, at its
own learning rate (``LTE_LEARNING_RATE``, 1e-3: a linear layer from scratch; the reference
uses the run's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    exit_task_loss,
    exit_task_losses,
    head_parameters,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


class AlternatingLoss:
    """BERxiT's alternating objective: the final exit's loss on even optimizer steps, the sum
    of every exit's loss on odd ones (``progress.step`` is the coming step, 0-based). Outside
    training (no planned steps) it reports the sum over exits."""

    def __init__(self, progress: TrainingProgress) -> None:
        self.progress = progress

    def final_only(self) -> bool:
        return self.progress.max_steps is not None and self.progress.step % 2 == 0

    def __call__(self, outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        final = len(outputs.logits) - 1
        if self.final_only():
            return exit_task_loss(outputs, labels, final)
        return exit_task_losses(outputs, labels).sum()


def certainty_targets(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(B, E) the learning-to-exit targets: 1 where exit k's arg-max equals the label, else 0;
    for regression outputs (B, 1), ``1 - tanh(|y_hat_k - y|)``. No gradient."""
    columns = []
    for z in logits:
        z = z.detach().float()
        if z.shape[-1] == 1:
            columns.append(1.0 - torch.tanh((z[:, 0] - labels.float()).abs()))
        else:
            columns.append((z.argmax(-1) == labels).float())
    return torch.stack(columns, dim=1)


def learning_to_exit_loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    """Mean over exits and rows of ``(u_k - c_k)^2`` (see :func:`certainty_targets`)."""
    if outputs.scores is None:
        raise ConfigError("the learning-to-exit loss needs the model's lte exit scorer")
    scores = torch.stack(outputs.scores, dim=1).float()
    return F.mse_loss(scores, certainty_targets(outputs.logits, labels))


# One linear layer trained from scratch on frozen features: at a fine-tuning rate (1e-5 to
# 1e-4) it hardly leaves its start in an epoch, so the stage has its own (``stage_args``
# overrides it).
LTE_LEARNING_RATE = 1e-3


@register_strategy("berxit")
class BERxiTStrategy(TrainingStrategy):
    tunes_backbone = True
    tasks = ("classification", "regression")

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("berxit needs at least one exit besides the final one")
        model.attach_scorer("lte")
        progress = TrainingProgress()
        return [
            Stage(name="stage-1",
                  trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                  loss=AlternatingLoss(progress), progress=progress),
            Stage(name="stage-2", trainable=lambda m: list(m.scorer.parameters()),
                  loss=learning_to_exit_loss, args={"learning_rate": LTE_LEARNING_RATE}),
        ]

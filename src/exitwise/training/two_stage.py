"""``two_stage`` (DeeBERT): fine-tune the model first, then the early exits on a frozen model.

Stage 1 trains the backbone and the final head on the final exit's cross-entropy only.
Stage 2 freezes the backbone and the final head and trains the other exits' heads on the sum
of their cross-entropies, so the final classifier's accuracy is exactly that of stage 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    exit_task_loss,
    head_parameters,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def final_exit_loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    """The final exit's task loss alone (what fine-tuning the plain model optimizes)."""
    return exit_task_loss(outputs, labels, len(outputs.logits) - 1)


def fine_tune_stage(model: MultiExitModel) -> Stage:
    """Train the backbone and the final head on the final exit's loss (DeeBERT's and
    FastBERT's first stage)."""
    final = model.num_exits - 1
    return Stage(name="stage-1",
                 trainable=lambda m: backbone_parameters(m) + head_parameters(m, [final]),
                 loss=final_exit_loss)


def _early_exits_loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    terms = [exit_task_loss(outputs, labels, k) for k in range(len(outputs.logits) - 1)]
    return torch.stack(terms).sum()


@register_strategy("two_stage")
class TwoStageStrategy(TrainingStrategy):
    tunes_backbone = True
    tasks = ("classification", "regression")

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("two_stage needs at least one exit besides the final one")
        final = model.num_exits - 1
        return [
            fine_tune_stage(model),
            Stage(
                name="stage-2",
                trainable=lambda m: head_parameters(m, range(final)),
                loss=_early_exits_loss,
            ),
        ]

"""``exits_only``: freeze the backbone, train every exit head (the final one included).

For a backbone that is already good at the task (or whose features are to be kept as they
are): each head learns from its own cross-entropy, loss = sum_k CE(logits_k, labels) / K.
Backbone weights never change, so ``model.backbone_tuned`` is left as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Stage, TrainingStrategy, head_parameters, register_strategy, weighted_exit_loss

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


@register_strategy("exits_only")
class ExitsOnlyStrategy(TrainingStrategy):
    tunes_backbone = False
    tasks = ("classification", "regression")

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        k = model.num_exits
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: head_parameters(m),
                loss=weighted_exit_loss([1.0 / k] * k),
            )
        ]

"""``joint``: train the backbone and every exit together on a weighted sum of exit losses.

loss = sum_k w_k * CE(logits_k, labels) (MSE for a regression model), with w from :mod:`exitwise.training.schedules`
(``weights="uniform"``, ``"depth"`` as in PABEE, or a list). Exits with weight 0 are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)
from .schedules import WeightSpec, exit_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


@register_strategy("joint")
class JointStrategy(TrainingStrategy):
    tunes_backbone = True
    tasks = ("classification", "regression")

    def __init__(
        self, weights: WeightSpec = "uniform", stage_args: Sequence[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(stage_args)
        self.weights = weights if isinstance(weights, str) else [float(w) for w in weights]

    def exit_weights(self, model: MultiExitModel) -> list[float]:
        return exit_weights(self.weights, model.exit_layers)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        w = self.exit_weights(model)
        active = [k for k, wk in enumerate(w) if wk > 0]
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m, active),
                loss=weighted_exit_loss(w),
            )
        ]

    def options(self) -> dict[str, Any]:
        return {"weights": self.weights, **super().options()}

"""``branchynet``: BranchyNet's joint weighted loss (Teerapittayanon et al., ICPR 2016).

The backbone and every branch train together on ``sum_k w_k CE(logits_k, labels)``. BranchyNet
weighs the early branches *more* than the final exit: the paper reports that this gives the
shallow layers more discriminative features (a regulariser) and its experiments use weights
such as 1.0 for the first branch and 0.3 for the main exit. The default here interpolates
linearly from 1.0 (first exit) down to 0.3 (final exit), normalised to sum to 1 like every
exitwise schedule; ``weights=[...]`` (one per exit) or ``"uniform"``/``"depth"`` override it.

This is :class:`~exitwise.training.joint.JointStrategy` with another default schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .base import register_strategy
from .joint import JointStrategy
from .schedules import WeightSpec, exit_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

FIRST_WEIGHT, FINAL_WEIGHT = 1.0, 0.3


def branchynet_weights(num_exits: int) -> list[float]:
    """Raw weights 1.0 (first exit) ... 0.3 (final exit), linear in the exit index."""
    if num_exits == 1:
        return [1.0]
    step = (FIRST_WEIGHT - FINAL_WEIGHT) / (num_exits - 1)
    return [FIRST_WEIGHT - k * step for k in range(num_exits)]


@register_strategy("branchynet")
class BranchyNetStrategy(JointStrategy):
    tunes_backbone = True

    def __init__(
        self,
        weights: WeightSpec = "branchynet",
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(weights if weights != "branchynet" else "uniform", stage_args)
        self.weights = weights if isinstance(weights, str) else [float(w) for w in weights]

    def exit_weights(self, model: MultiExitModel) -> list[float]:
        spec = branchynet_weights(model.num_exits) if self.weights == "branchynet" else self.weights
        return exit_weights(spec, model.exit_layers)

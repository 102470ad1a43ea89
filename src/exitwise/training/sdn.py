"""Shallow-Deep Networks' two strategies (Kaya, Hong & Dumitras, ICML 2019).

``sdn_ramp`` (SDN-training, the paper's Section 4.2 weighted loss; reference: SDN's
``sdn_train`` in ``model_funcs.py``, kept in ``gmum/Zero-Time-Waste``): the backbone and all
internal classifiers (ICs) train together on ``sum_k tau_k(epoch) * CE_k + CE_final``. Each
IC's weight starts near 0 and grows linearly with the epoch to its target, as in SDN's code:
at (1-based) epoch e of E, ``tau_k = min(target_k, 0.01 + e * target_k / E)``. The targets are
the ICs' placement-relative costs: SDN's ``max_coeffs = [0.15, 0.3, ..., 0.9]`` are the
fractions of the network's FLOPs spent when each IC is reached (its exits sit at 15%..90% of
the compute). Here ``target_k`` is the backbone's cumulative FLOPs (stem included) at exit k
divided by the whole backbone's (:func:`exit_cost_fractions`), or a list of one target per
IC. The final exit always weighs 1. Early in training the ICs barely pull on the backbone, so
the deep features form first; later the ICs are trained in earnest.

``sdn_ic_only`` (IC-only training): the pretrained network (backbone and final classifier) is
frozen and only the ICs train, each on its own cross-entropy. The final exit's accuracy is
exactly that of the network it started from.

Outside training (``progress.num_epochs`` unknown) ``sdn_ramp``'s loss uses the targets.

Deviations: a backbone that cannot report its FLOPs for one input (a text encoder without an
example) falls back to the exits' depth fractions, which equal the FLOPs fractions for a stack
of identical blocks when the embedding is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..backbones.base import BackboneState
from ..backbones.placement import cumulative_flops
from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    exit_cross_entropy,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

RAMP_START = 0.01


class RampedExitLoss:
    """``sum_k tau_k(progress) CE_k`` over the ICs + ``CE_final`` (see the module doc)."""

    def __init__(self, targets: Sequence[float], progress: TrainingProgress) -> None:
        self.targets = [float(t) for t in targets]
        self.progress = progress

    def weights(self) -> list[float]:
        """Current weights, one per exit (the final exit's is 1)."""
        e_total = self.progress.num_epochs
        if not e_total:
            ics = list(self.targets)
        else:
            e = min(e_total, int(math.floor(self.progress.epoch)) + 1)
            ics = [min(t, RAMP_START + e * t / e_total) for t in self.targets]
        return ics + [1.0]

    def __call__(self, outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        if len(outputs.logits) != len(w):
            raise ConfigError(f"{len(w)} exit weights for a model with {len(outputs.logits)} exits")
        terms = [wk * exit_cross_entropy(outputs, labels, k) for k, wk in enumerate(w)]
        return torch.stack(terms).sum()


def _cumulative_backbone_flops(backbone: Any) -> torch.Tensor | None:
    """(num_layers + 1,) cumulative FLOPs for one input (stem first), or None if unknown."""
    try:
        return cumulative_flops(backbone)
    except ConfigError:
        pass
    try:  # adapters whose costs do not depend on the input (a sequential stack): one row
        state = BackboneState(hidden=torch.zeros(1, 1), mask=torch.ones(1, 1, dtype=torch.long))
        costs = [backbone.start_flops(state).double().mean()]
        costs += [backbone.layer_flops(i, state).double().mean()
                  for i in range(backbone.num_layers)]
        return torch.stack(costs).cumsum(0)
    except Exception:  # noqa: BLE001 - any adapter-specific failure means "cost unknown"
        return None


def exit_cost_fractions(model: MultiExitModel) -> list[float]:
    """Each exit's share of the backbone's compute: cumulative FLOPs (stem included) at its
    depth over the whole backbone's, shallowest first (the final exit's is 1). Falls back to
    ``depth / num_layers`` when the backbone cannot report its FLOPs."""
    cum = _cumulative_backbone_flops(model.backbone)
    if cum is None or not float(cum[-1]) > 0:
        return [d / model.backbone.num_layers for d in model.exit_layers]
    return [float(cum[d] / cum[-1]) for d in model.exit_layers]


def sdn_targets(model: MultiExitModel, targets: Sequence[float] | None) -> list[float]:
    """The ICs' final weights: given, or each IC's FLOPs fraction of the backbone."""
    n_ic = model.num_exits - 1
    if n_ic < 1:
        raise ConfigError(
            "SDN strategies need at least one internal classifier besides the final exit"
        )
    if targets is None:
        return exit_cost_fractions(model)[:-1]
    out = [float(t) for t in targets]
    if len(out) != n_ic or any(not math.isfinite(t) or t < 0 for t in out):
        raise ConfigError(
            f"give {n_ic} finite non-negative IC targets (one per internal exit); got {targets}"
        )
    return out


@register_strategy("sdn_ramp")
class SDNRampStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        targets: Sequence[float] | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        self.targets = None if targets is None else [float(t) for t in targets]

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        progress = TrainingProgress()
        loss = RampedExitLoss(sdn_targets(model, self.targets), progress)
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=loss,
                progress=progress,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {"targets": self.targets, **super().options()}


@register_strategy("sdn_ic_only")
class SDNICOnlyStrategy(TrainingStrategy):
    tunes_backbone = False

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        n_ic = len(sdn_targets(model, None))
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: head_parameters(m, range(n_ic)),
                loss=weighted_exit_loss([1.0] * n_ic + [0.0]),
            )
        ]

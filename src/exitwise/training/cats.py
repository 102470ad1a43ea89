"""``cats``: training for CATs (Schuster et al., EMNLP 2021, "Consistent Accelerated Inference
via Confident Adaptive Transformers", sec. 4.1).

- stage 1 (``fine-tune``, skipped with ``finetune=False`` for a model already trained): the
  backbone and every exit on the sum of the exits' losses (``joint``'s uniform weights);
- stage 2 (``meta``): the model frozen, the meta consistency classifier (the ``cats`` exit
  scorer) learns, at every early exit k, whether exit k's arg-max equals the final exit's:
  binary cross-entropy of ``g_k`` against ``1[argmax z_k == argmax z_final]``, averaged over
  the early exits and rows. No label is read: the targets are the model's own predictions.

Calibrate the threshold with :func:`exitwise.calibration.conformal.calibrate_cats`; exit with
the ``cats`` policy. Deviation: the authors' training code was not found; the meta
classifier's inputs are this library's (see :mod:`exitwise.heads.cats`) and it trains at its
own learning rate (``META_LEARNING_RATE``; ``stage_args`` overrides it), as BERxiT's module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..options import flag
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

META_LEARNING_RATE = 1e-3


def meta_consistency_loss(outputs: ExitOutputs, labels: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Mean over early exits and rows of BCE(g_k, 1[argmax z_k == argmax z_final]);
    ``labels`` are not read."""
    if outputs.scores is None:
        raise ConfigError("the meta consistency loss needs the model's cats exit scorer")
    final = outputs.logits[-1].detach().argmax(-1)
    terms = []
    for z, g in zip(outputs.logits[:-1], outputs.scores[:-1]):
        target = (z.detach().argmax(-1) == final).float()
        terms.append(F.binary_cross_entropy(g.float().clamp(1e-6, 1 - 1e-6), target))
    return torch.stack(terms).mean()


@register_strategy("cats")
class CATsStrategy(TrainingStrategy):
    tunes_backbone = True
    tasks = ("classification",)  # consistency of predicted classes

    def __init__(self, finetune: bool = True, hidden: int = 64,
                 stage_args: Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__(stage_args)
        self.finetune = flag("cats", "finetune", finetune)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"cats: hidden (the scorer's width) must be an int >= 1; "
                              f"got {hidden!r}")  # 0 once trained a constant scorer
        self.hidden = hidden
        self.tunes_backbone = self.finetune

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("cats needs at least one exit besides the final one")
        model.attach_scorer("cats", hidden=self.hidden)
        meta = Stage(name="stage-2" if self.finetune else "stage-1",
                     trainable=lambda m: list(m.scorer.parameters()),
                     loss=meta_consistency_loss, args={"learning_rate": META_LEARNING_RATE})
        if not self.finetune:
            return [meta]
        return [
            Stage(name="stage-1",
                  trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                  loss=weighted_exit_loss([1.0] * model.num_exits)),
            meta,
        ]

    def options(self) -> dict[str, Any]:
        return {"finetune": self.finetune, "hidden": self.hidden, **super().options()}

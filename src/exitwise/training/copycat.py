"""``copycat_sl_vit``: SL-ViT's CopycatSL-ViT fine-tuning (Bakhtiarnia, Zhang & Iosifidis,
"Single-Layer Vision Transformers for More Accurate Early Exits with Less Overhead", Neural
Networks 2022).

SL-ViT puts one transformer layer before the classifier of every early exit (the ``vit_layer``
head) and trains the exits on a frozen, already trained backbone. CopycatSL-ViT then
fine-tunes the exits as "copycats" of the final classifier, after Copycat CNN (Correia-Silva
et al., 2018, which trains a network on the labels another network predicts): each exit is
trained on the final exit's predictions instead of the ground truth, so it learns to agree
with the network it stands in for. Two stages, backbone and final classifier frozen in both:

1. ``stage-1`` (``pretrain_exits=True``): every early exit on the true labels,
   ``sum_k CE(z_k, y)`` (SL-ViT's training of the branches);
2. ``stage-2``: every early exit on the final exit's predicted labels,
   ``sum_k CE(z_k, argmax z_final)`` (``targets="hard"``, Copycat CNN's stolen labels), or on
   its softmax (``targets="soft"``, a cross-entropy against the probabilities).

Deviations and sources: the authors' code was not available to check against; the mechanism
follows the paper's description of CopycatSL-ViT (fine-tuning the early exits with the final
layer's outputs as their targets). For regression models the paper's targets are the final
output itself; this strategy covers classification only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..options import flag
from ..outputs import ExitOutputs
from .base import Stage, TrainingStrategy, head_parameters, register_strategy, weighted_exit_loss

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

TARGETS = ("hard", "soft")


def copycat_loss(targets: str):
    """``sum_k CE(z_k, t)`` over the early exits, ``t`` the final exit's predicted class
    (``"hard"``) or its softmax (``"soft"``), detached; the labels are not used."""

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        final = outputs.logits[-1].detach().float()
        target = final.argmax(-1) if targets == "hard" else final.softmax(-1)
        terms = [F.cross_entropy(z.float(), target) for z in outputs.logits[:-1]]
        return torch.stack(terms).sum()

    return loss


@register_strategy("copycat_sl_vit")
class CopycatSLViTStrategy(TrainingStrategy):
    tunes_backbone = False

    def __init__(
        self,
        targets: str = "hard",
        pretrain_exits: bool = True,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if targets not in TARGETS:
            raise ConfigError(f"targets must be one of {TARGETS}, got {targets!r}")
        self.targets = targets
        self.pretrain_exits = flag("copycat_sl_vit", "pretrain_exits", pretrain_exits)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        n = model.num_exits - 1
        if n < 1:
            raise ConfigError("copycat_sl_vit needs at least one exit besides the final one")
        stages = []
        if self.pretrain_exits:
            stages.append(Stage(
                name="stage-1",
                trainable=lambda m: head_parameters(m, range(n)),
                loss=weighted_exit_loss([1.0] * n + [0.0]),
            ))
        stages.append(Stage(
            name=f"stage-{len(stages) + 1}",
            trainable=lambda m: head_parameters(m, range(n)),
            loss=copycat_loss(self.targets),
        ))
        return stages

    def options(self) -> dict[str, Any]:
        return {"targets": self.targets, "pretrain_exits": self.pretrain_exits,
                **super().options()}

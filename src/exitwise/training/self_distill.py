"""``self_distill``: Be Your Own Teacher (Zhang et al., ICCV 2019).

The deepest exit teaches the shallow ones inside one network, in one training run:

    loss = CE_final + sum_{k<K-1} [ (1 - alpha) CE_k
                                    + alpha T^2 KL(p_final^T || p_k^T)
                                    + lambda ||F_k - F_final||^2 ]

where ``F_k`` is what exit k's classifier layer reads (its "bottleneck" output: BYOT's shallow
classifiers end in a bottleneck that maps their features to the deepest feature's shape) and
the deepest logits and features are detached (the teacher only gives targets). ``||.||^2`` is
the squared L2 distance per example, averaged over the batch. BYOT's defaults: alpha = 0.3,
T = 3, lambda = 0.03.

The hint needs every shallow head's feature to be as wide as the final head's: use heads with
a common bottleneck width (``head="mlp", head_kwargs={"hidden_features": D}``), or set
``hint_weight=0``. The training forward asks the model for the features; the loss evaluated on
outputs without them (plain ``model(...)``) leaves the hint term out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..heads import classifier_layer
from ..outputs import ExitOutputs
from .base import (
    check_distillation_options,
    Stage,
    TrainingStrategy,
    backbone_parameters,
    distillation_kl,
    exit_cross_entropy,
    head_parameters,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def feature_hint(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``||student - teacher||^2`` (B, D) each, teacher detached."""
    diff = student.float().flatten(1) - teacher.detach().float().flatten(1)
    return diff.pow(2).sum(-1).mean()


def byot_loss(alpha: float, temperature: float, hint_weight: float):
    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        last = len(outputs.logits) - 1
        teacher = outputs.logits[last]
        feats = outputs.features
        terms = [exit_cross_entropy(outputs, labels, last)]
        for k in range(last):
            term = (1.0 - alpha) * exit_cross_entropy(outputs, labels, k)
            if alpha:
                term = term + alpha * distillation_kl(outputs.logits[k], teacher, temperature)
            if hint_weight and feats is not None:
                if feats[k] is None or feats[last] is None:
                    raise ConfigError("self_distill hints need heads with a classifier layer")
                if feats[k].shape[1:] != feats[last].shape[1:]:
                    raise ConfigError(
                        f"exit {k}'s feature is {tuple(feats[k].shape[1:])} wide, the final "
                        f"exit's {tuple(feats[last].shape[1:])}: give the heads a common "
                        "bottleneck (head='mlp', head_kwargs={'hidden_features': D}) or "
                        "set hint_weight=0"
                    )
                term = term + hint_weight * feature_hint(feats[k], feats[last])
            terms.append(term)
        return torch.stack(terms).sum()

    return loss


@register_strategy("self_distill")
class SelfDistillStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        alpha: float = 0.3,
        temperature: float = 3.0,
        hint_weight: float = 0.03,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        alpha, temperature = check_distillation_options(alpha, temperature)
        if not float(hint_weight) >= 0:
            raise ConfigError(f"hint_weight must be >= 0, got {hint_weight}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.hint_weight = float(hint_weight)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("self_distill needs at least one exit besides the final one")
        if self.hint_weight:
            widths = [getattr(classifier_layer(h), "in_features", None) for h in model.heads]
            if None not in widths and len(set(widths)) > 1:
                raise ConfigError(
                    f"self_distill feature hints need every head's feature as wide as the final "
                    f"one's; the heads' widths are {widths}: give them a common bottleneck "
                    "(head='mlp', head_kwargs={'hidden_features': D}) or set hint_weight=0"
                )
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=byot_loss(self.alpha, self.temperature, self.hint_weight),
                forward_kwargs={"return_features": True} if self.hint_weight else {},
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "hint_weight": self.hint_weight,
            **super().options(),
        }

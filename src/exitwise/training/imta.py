"""``imta``: Improved Techniques for Training Adaptive Deep Networks (Li et al., ICCV 2019).

Three techniques, all on by default:

- **Gradient equilibrium** (GE): with K exits the shallow blocks receive the *sum* of K
  gradients, so their gradient grows with K and conflicts between exits. GE rescales the
  backward pass where each exit reads the trunk: the shared point by 1/(K-k) and the deeper
  trunk path by (K-k-1), so the blocks before exit k get the *mean* of the gradients of exits
  k..K-1 (:func:`~exitwise.training.base.gradient_equilibrium_scales`; forward values do not
  change). The exit heads' own gradients are not rescaled.
- **Inline subnetwork collaboration** (ISC): exit k also reads exit k-1's logits, with the
  gradient flowing back through them (unlike ZTW). That is an architecture choice: build the
  model with ``head="cascade", head_kwargs={"detach_previous": False}``. With other heads this
  recipe trains GE + distillation and says so (a warning).
- **One-for-all knowledge distillation** (OFA): the final exit teaches every earlier exit:
  ``loss = sum_{k<K-1} [(1 - alpha) CE_k + alpha T^2 KL(p_final^T || p_k^T)] + CE_final``,
  the teacher detached.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..heads import uses_previous_logits
from ..outputs import ExitOutputs
from .base import (
    check_distillation_options,
    Stage,
    TrainingStrategy,
    backbone_parameters,
    distillation_kl,
    exit_cross_entropy,
    gradient_equilibrium_scales,
    head_parameters,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def one_for_all_loss(alpha: float, temperature: float):
    """The OFA distillation objective above, as a stage loss."""

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        teacher = outputs.logits[-1]
        terms = [exit_cross_entropy(outputs, labels, len(outputs.logits) - 1)]
        for k, z in enumerate(outputs.logits[:-1]):
            ce = exit_cross_entropy(outputs, labels, k)
            kd = distillation_kl(z, teacher, temperature) if alpha else ce.new_zeros(())
            terms.append((1.0 - alpha) * ce + alpha * kd)
        return torch.stack(terms).sum()

    return loss


@register_strategy("imta")
class IMTAStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 3.0,
        gradient_equilibrium: bool = True,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        alpha, temperature = check_distillation_options(alpha, temperature)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.gradient_equilibrium = bool(gradient_equilibrium)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("imta needs at least one exit besides the final one")
        later = model.heads[1:]
        if not all(uses_previous_logits(h) for h in later):
            warnings.warn(
                "imta: inline subnetwork collaboration needs cascade heads "
                "(head='cascade', head_kwargs={'detach_previous': False}); training with "
                "gradient equilibrium and one-for-all distillation only",
                stacklevel=3,
            )
        elif any(getattr(h, "detach_previous", False) for h in later):
            warnings.warn(
                "imta: the cascade heads detach the previous logits (ZTW style); IMTA's inline "
                "collaboration lets gradients flow (head_kwargs={'detach_previous': False})",
                stacklevel=3,
            )
        forward = (
            {"grad_scales": gradient_equilibrium_scales(model.num_exits)}
            if self.gradient_equilibrium
            else {}
        )
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=one_for_all_loss(self.alpha, self.temperature),
                forward_kwargs=forward,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "gradient_equilibrium": self.gradient_equilibrium,
            **super().options(),
        }

"""``boosted``: Boosted Dynamic Networks, BoostNet (Yu et al., AAAI 2023).

The exits form an additive model, as in gradient boosting: exit k predicts
``F_k = F_{k-1} + f_k`` where ``f_k`` is head k's own output and ``F_{k-1}`` the ensemble of
the heads before it, *detached* when training stage k, so head k (and the blocks it reads)
learns the residual the earlier exits left. All stages train jointly on every mini-batch:
``loss = sum_k CE(f_k + F_{k-1} / T, labels)``.

- ``prior_temperature`` T (BoostNet's prediction reweighting): only T = 1 (the plain additive
  model) is accepted, because the additive cascade head applies no reweighting at inference
  and a model trained with ``F_{k-1} / T`` would not be the one that runs.
- ``gradient_rescaling`` (default on): the backbone gradients from the different exits are
  rescaled as in IMTA's gradient equilibrium, so they stay bounded however many exits there
  are (:func:`~exitwise.training.base.gradient_equilibrium_scales`).

The additive model must also hold at inference: build the model with
``head="cascade", head_kwargs={"combine": "additive"}`` (the heads then output F_k, with
F_{k-1} detached). With other heads the recipe forms the sums in the loss only and warns,
since the exits then predict ``f_k`` alone at inference.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    gradient_equilibrium_scales,
    head_parameters,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def is_additive(model: MultiExitModel) -> bool:
    """True when every exit after the first outputs ``F_{k-1}.detach() + f_k`` itself."""
    return all(
        getattr(h, "combine", None) == "additive" and getattr(h, "detach_previous", False)
        for h in model.heads[1:]
    )


def boosted_loss(additive: bool, prior_temperature: float):
    """``sum_k CE(f_k + F_{k-1}.detach() / T)``; ``additive``: the logits already are F_k."""
    t = float(prior_temperature)

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        z = [x.float() for x in outputs.logits]
        terms = [F.cross_entropy(z[0], labels)]
        running = z[0].detach()  # F_0 (non-additive heads: the sum is formed here)
        for k in range(1, len(z)):
            prior = z[k - 1].detach() if additive else running
            own = z[k] - prior if additive else z[k]  # f_k, its gradient path intact
            terms.append(F.cross_entropy(own + prior / t, labels))
            running = running + z[k].detach()
        return torch.stack(terms).sum()

    return loss


@register_strategy("boosted")
class BoostedStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        prior_temperature: float = 1.0,
        gradient_rescaling: bool = True,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if not float(prior_temperature) > 0:
            raise ConfigError(f"prior_temperature must be > 0, got {prior_temperature}")
        if float(prior_temperature) != 1.0:
            # The additive cascade head adds the previous exits' sum unscaled at inference;
            # training with F/T would train a different model than the one that runs.
            raise ConfigError(
                "prior_temperature != 1 is not supported: the additive cascade head applies no "
                "reweighting at inference, so training and inference would differ"
            )
        self.prior_temperature = float(prior_temperature)
        self.gradient_rescaling = bool(gradient_rescaling)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("boosted needs at least one exit besides the final one")
        additive = is_additive(model)
        if not additive:
            warnings.warn(
                "boosted: the heads do not add the previous exits' logits themselves; the "
                "boosting sums are formed in the loss only, so at inference each exit predicts "
                "its residual alone. Build the model with head='cascade', "
                "head_kwargs={'combine': 'additive'}",
                stacklevel=3,
            )
        forward = (
            {"grad_scales": gradient_equilibrium_scales(model.num_exits)}
            if self.gradient_rescaling
            else {}
        )
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=boosted_loss(additive, self.prior_temperature),
                forward_kwargs=forward,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "prior_temperature": self.prior_temperature,
            "gradient_rescaling": self.gradient_rescaling,
            **super().options(),
        }

"""``imta``: Improved Techniques for Training Adaptive Deep Networks (Li et al., ICCV 2019).

Two stages, as the authors' code (``kalviny/IMTA``: ``main_GE.py``, then ``main_IMTA.py``):

1. **Gradient equilibrium** (GE, ``models/msdnet_ge.py``): the whole network (backbone and
   every exit's classifier) trains from scratch on ``sum_k CE_k``, with the backward pass
   rescaled where each exit reads the trunk: the shared point by 1/(K-k) and the deeper trunk
   path by (K-k-1), so the blocks before exit k get the *mean* of the gradients of exits
   k..K-1 (:func:`~exitwise.training.base.gradient_equilibrium_scales`; forward values do not
   change). The collaboration links (below) do not train here: zero-initialised, they leave
   each exit its plain classifier, the reference's GE network.
2. **Inline subnetwork collaboration + one-for-all distillation** (ISC + OFA,
   ``models/msdnet_imta.py``, ``utils.py`` ``KDLoss``): the stage-1 network is frozen; what
   trains is each exit's classifier layer and its collaboration link, which maps the previous
   exit's logits through ``ReLU(BN(Linear(C -> D)))`` and concatenates them with the features
   (build the model with ``head="cascade", head_kwargs={"combine": "isc",
   "detach_previous": False}``; gradients flow through the previous logits, as the
   reference). The loss distils the frozen network's final exit into every earlier one::

       loss = CE(z_final) + sum_{k<K-1} [ (1 - gamma) CE(z_k) + gamma T^2 KL(p_T^T || p_k^T) ]

   where ``p_T`` is the final exit's prediction *of the stage-1 network* (its classifier on
   the frozen features, without the collaboration input) and ``z_k`` the new exits' logits.

Defaults as the reference's ``args.py``: gamma (``alpha`` here) = 0.9, T = 3 (its ImageNet
script runs T = 1, gamma = 0.1). The reference's ``nn.KLDivLoss()`` averages over batch *and*
classes (``kl_reduction="mean"``, default); ``"batchmean"`` is the KL per example.

Deviations: the reference's second stage trains new linear classifiers on the frozen GE
network's pooled features; here each exit's existing classifier layer continues from its
stage-1 weights, and the final exit's classifier on the features stays frozen (it is the
teacher) while its collaboration link trains. With heads that are not cascade heads the
strategy runs GE + OFA without collaboration and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..heads import classifier_layer, uses_previous_logits
from ..options import flag
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    check_distillation_options,
    exit_cross_entropy,
    gradient_equilibrium_scales,
    later_exits,
    register_strategy,
    weighted_exit_loss,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

KL_REDUCTIONS = ("mean", "batchmean")


def kd_term(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` over (B, C) logits, teacher
    detached; ``reduction="mean"`` divides the summed KL by B*C (the reference's
    ``nn.KLDivLoss()``), ``"batchmean"`` by B."""
    t = float(temperature)
    target = F.log_softmax(teacher.detach().float() / t, -1)
    pred = F.log_softmax(student.float() / t, -1)
    total = (target.exp() * (target - pred)).sum()
    count = student.numel() if reduction == "mean" else student.shape[0]
    return total / count * t * t


def link_parameters(head: nn.Module) -> list[nn.Parameter]:
    """The collaboration link's parameters of a cascade head (none for other heads)."""
    return [p for m in getattr(head, "link_modules", []) for p in m.parameters()]


def stage1_parameters(model: MultiExitModel) -> list[nn.Parameter]:
    """Backbone and heads, without the collaboration links (the GE network)."""
    links = {id(p) for h in model.heads for p in link_parameters(h)}
    heads = [p for p in model.heads.parameters() if id(p) not in links]
    return backbone_parameters(model) + heads


def stage2_parameters(model: MultiExitModel) -> list[nn.Parameter]:
    """Every exit's classifier layer and link; the final exit's link only (its classifier on
    the features is the frozen teacher)."""
    last = model.num_exits - 1
    out: list[nn.Parameter] = []
    for k, head in enumerate(model.heads):
        if k < last:
            layer = classifier_layer(head)
            out += list(layer.parameters()) if layer is not None else list(head.parameters())
        out += link_parameters(head)
    return out


def one_for_all_loss(
    alpha: float, temperature: float, reduction: str, teacher_layer: nn.Module
):
    """The OFA objective above; the teacher is ``teacher_layer`` (the final exit's frozen
    classifier layer) applied to the final exit's feature (needs ``return_features``)."""

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        if outputs.features is None or outputs.features[-1] is None:
            raise ConfigError("imta's distillation reads the final exit's feature: run the "
                              "forward with return_features=True")
        with torch.no_grad():
            teacher = teacher_layer(outputs.features[-1])
        last = len(outputs.logits) - 1
        terms = [exit_cross_entropy(outputs, labels, last)]
        for k in range(last):
            ce = exit_cross_entropy(outputs, labels, k)
            kd = kd_term(outputs.logits[k], teacher, temperature, reduction)
            terms.append((1.0 - alpha) * ce + alpha * kd)
        return torch.stack(terms).sum()

    return loss


@register_strategy("imta")
class IMTAStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        alpha: float = 0.9,
        temperature: float = 3.0,
        gradient_equilibrium: bool = True,
        kl_reduction: str = "mean",
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        alpha, temperature = check_distillation_options(alpha, temperature)
        if kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.gradient_equilibrium = flag("imta", "gradient_equilibrium",
                                         gradient_equilibrium)
        self.kl_reduction = kl_reduction

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("imta needs at least one exit besides the final one")
        later = later_exits(model)  # a native final exit predicts alone
        if not all(uses_previous_logits(h) for h in later):
            warnings.warn(
                "imta: inline subnetwork collaboration needs cascade heads (head='cascade', "
                "head_kwargs={'combine': 'isc', 'detach_previous': False}); training with "
                "gradient equilibrium and one-for-all distillation only",
                stacklevel=3,
            )
        elif any(getattr(h, "combine", None) != "isc" or h.detach_previous for h in later):
            warnings.warn(
                "imta: IMTA's inline collaboration maps the previous logits through "
                "Linear+BN+ReLU and lets gradients flow (head_kwargs={'combine': 'isc', "
                "'detach_previous': False})",
                stacklevel=3,
            )
        teacher_layer = classifier_layer(model.heads[-1])
        if teacher_layer is None:
            raise ConfigError("imta distils the final exit's classifier layer; this final head "
                              f"({type(model.heads[-1]).registered_name}) has none")
        forward = (
            {"grad_scales": gradient_equilibrium_scales(model.num_exits)}
            if self.gradient_equilibrium
            else {}
        )
        return [
            Stage(
                name="stage-1",
                trainable=stage1_parameters,
                loss=weighted_exit_loss([1.0] * model.num_exits),
                forward_kwargs=forward,
            ),
            Stage(
                name="stage-2",
                trainable=stage2_parameters,
                loss=one_for_all_loss(
                    self.alpha, self.temperature, self.kl_reduction, teacher_layer
                ),
                forward_kwargs={"return_features": True},
            ),
        ]

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "gradient_equilibrium": self.gradient_equilibrium,
            "kl_reduction": self.kl_reduction,
            **super().options(),
        }

"""``self_distill``: Be Your Own Teacher, BYOT (Zhang et al., ICCV 2019).

The deepest exit teaches the shallow ones inside one network, in one training run. Reference:
the authors' ``train.py`` in ``ArchipLab-LinfengZhang/pytorch-self-distillation-final`` and its
feature-distillation version (the ``adaptation_layers`` variant with
``--feature_loss_coefficient``)::

    loss = CE_final + sum_{k<K-1} [ (1 - alpha) CE_k + alpha SoftCE_T(z_k, z_final) ]
                    + lambda sum_{k<K-1, k hinted} || A_k(F_k) - F_final ||

- ``SoftCE_T`` is the reference's ``CrossEntropy``: the cross-entropy of the student's
  softmax at temperature T against the teacher's, batch mean, *without* the ``T^2`` factor of
  Hinton's KD (:func:`~exitwise.training.base.soft_cross_entropy`).
- ``F_k`` is what exit k's classifier layer reads (its pooled "bottleneck" feature), ``A_k`` a
  learned linear adaptation layer (``nn.Linear(D_k, D_final)``, the reference's
  ``adaptation_layers``), so the heads need not share widths. The adaptation layers train with
  the strategy; they live on the model as the submodule ``model.self_distill_adapters`` from
  the first stage on and stay there afterwards (so stage checkpoints and a resume hold them;
  ``save_pretrained`` writes only the heads, and inference never reads them).
- ``||.||`` is ``torch.dist``: the L2 (Frobenius) norm of the whole (B, D) difference, not
  squared and not averaged, as in the reference.
- The deepest exit's logits and feature are detached (the teacher only gives targets).
- Which exit gets no hint: the reference applies the hint to every shallow classifier but
  ``outputs[1]``; its networks return ``[deepest, 3/4, 2/4, 1/4]``, so that is the *deepest*
  internal classifier, the one right before the final exit, although the reference's comment
  says "shallowest". ``hint_skip="deepest_internal"`` (default) follows the code,
  ``"shallowest"`` the comment, ``"none"`` hints every exit. The distillation and
  cross-entropy terms cover every shallow classifier in all cases.

Defaults as the reference: alpha = 0.3 (``loss_coefficient``), T = 3, lambda = 0.03
(``feature_loss_coefficient``). The training forward asks the model for the features; the loss
evaluated on outputs without them (plain ``model(...)``) leaves the hint term out.

Deviations: the reference builds the adaptation layers lazily on the first batch and then
rebuilds its optimizer; here they are created when the stages are built, before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from ..heads import classifier_layer
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    check_distillation_options,
    exit_cross_entropy,
    head_parameters,
    register_strategy,
    soft_cross_entropy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

ADAPTERS = "self_distill_adapters"
HINT_SKIPS = ("deepest_internal", "shallowest", "none")


def feature_hint(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``torch.dist(student, teacher)``: the L2 norm of the whole (B, D) difference, teacher
    detached (the reference's feature distillation)."""
    return torch.dist(student.float().flatten(1), teacher.detach().float().flatten(1))


def hinted_exits(num_exits: int, hint_skip: str) -> list[int]:
    """Indices of the shallow exits that get a feature hint (see the module doc)."""
    shallow = list(range(num_exits - 1))
    if hint_skip == "deepest_internal":
        return shallow[:-1]
    if hint_skip == "shallowest":
        return shallow[1:]
    return shallow


class HintAdapters(nn.Module):
    """One ``nn.Linear(D_k, D_final)`` per hinted exit (the reference's adaptation layers)."""

    def __init__(self, widths: Sequence[int], hinted: Sequence[int]) -> None:
        super().__init__()
        target = int(widths[-1])
        self.exits = [int(k) for k in hinted]
        self.layers = nn.ModuleDict({str(k): nn.Linear(int(widths[k]), target) for k in hinted})

    def forward(self, k: int, feature: torch.Tensor) -> torch.Tensor:
        """Exit k's feature (B, D_k) mapped to the final feature's width (B, D_final)."""
        return self.layers[str(k)](feature.flatten(1).to(self.layers[str(k)].weight.dtype))


def attach_adapters(model: MultiExitModel, hint_skip: str) -> HintAdapters:
    """The model's adaptation layers, created (on the heads' device) on first use."""
    found = getattr(model, ADAPTERS, None)
    hinted = hinted_exits(model.num_exits, hint_skip)
    widths = [getattr(classifier_layer(h), "in_features", None) for h in model.heads]
    if any(widths[k] is None for k in hinted + [model.num_exits - 1]):
        raise ConfigError(
            "self_distill hints read the input of each head's classifier layer; these heads "
            f"({[type(h).registered_name for h in model.heads]}) do not all have one: set "
            "hint_weight=0"
        )
    if isinstance(found, HintAdapters) and found.exits == hinted:
        return found
    device = next(model.heads.parameters()).device
    adapters = HintAdapters(widths, hinted).to(device)
    model.add_module(ADAPTERS, adapters)  # a submodule, so the Trainer's optimizer sees it
    return adapters


def byot_loss(
    alpha: float, temperature: float, hint_weight: float, adapters: HintAdapters | None = None
):
    """The BYOT objective above as a stage loss (the hint needs ``adapters`` and features)."""

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        last = len(outputs.logits) - 1
        teacher = outputs.logits[last]
        feats = outputs.features
        terms = [exit_cross_entropy(outputs, labels, last)]
        for k in range(last):
            term = (1.0 - alpha) * exit_cross_entropy(outputs, labels, k)
            if alpha:
                term = term + alpha * soft_cross_entropy(outputs.logits[k], teacher, temperature)
            if hint_weight and feats is not None and adapters is not None and k in adapters.exits:
                if feats[k] is None or feats[last] is None:
                    raise ConfigError("self_distill hints need heads with a classifier layer")
                term = term + hint_weight * feature_hint(adapters(k, feats[k]), feats[last])
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
        hint_skip: str = "deepest_internal",
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        alpha, temperature = check_distillation_options(alpha, temperature)
        if not float(hint_weight) >= 0:
            raise ConfigError(f"hint_weight must be >= 0, got {hint_weight}")
        if hint_skip not in HINT_SKIPS:
            raise ConfigError(f"hint_skip must be one of {HINT_SKIPS}, got {hint_skip!r}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.hint_weight, self.hint_skip = float(hint_weight), hint_skip

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("self_distill needs at least one exit besides the final one")
        hinted = hinted_exits(model.num_exits, self.hint_skip) if self.hint_weight else []
        # (two exits and the internal one skipped: nothing to hint, no adapters)
        adapters = attach_adapters(model, self.hint_skip) if hinted else None

        def trainable(m: MultiExitModel) -> list[nn.Parameter]:
            extra = list(getattr(m, ADAPTERS).parameters()) if adapters is not None else []
            return backbone_parameters(m) + head_parameters(m) + extra

        return [
            Stage(
                name="stage-1",
                trainable=trainable,
                loss=byot_loss(self.alpha, self.temperature, self.hint_weight, adapters),
                forward_kwargs={"return_features": True} if adapters is not None else {},
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "hint_weight": self.hint_weight,
            "hint_skip": self.hint_skip,
            **super().options(),
        }

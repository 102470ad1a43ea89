"""``romebert``: RomeBERT (Geng et al., "RomeBERT: Robust Training of Multi-Exit BERT", 2021,
arXiv 2101.09755, sec. 3): self-distillation (SD) of the early exits from the final one, plus
gradient regularization (GR) between the final classifier's loss and the early exits' losses.

Reference: ``romebert/RomeBERT``, ``transformers/new_modeling_highway_bert.py`` (``KDLoss``, the
``kd_loss_type='raw'`` branch of ``BertForSequenceClassification.forward``) and
``examples/new_run_highway_glue.py`` (``train``, the ``args.gp`` branch); defaults from
``new_scripts/train_high.sh`` (``--gamma 0.9 --temper 3.0 --kd_loss_type raw --gp``). One stage
trains the backbone and every exit together.

SD, for exits k < K-1 with the final exit K-1 as the (detached) teacher::

    L_final = CE(z_{K-1}, y)
    L_exits = sum_{k<K-1} (1 - gamma) CE(z_k, y) + gamma T^2 KL(softmax(z_{K-1}/T) || softmax(z_k/T))

The reference's ``nn.KLDivLoss()`` uses PyTorch's old default reduction ``'mean'``: the sum
over batch *and classes* divided by B x C; ``kl_reduction="mean"`` (default) keeps that value,
``"batchmean"`` gives the textbook KL (divided by B only). The objective is L_final + L_exits.

GR (``projection``), a one-sided PCGrad: the two losses' gradients g_a (kept) and g_b
(projected) are taken separately; over the shared weight matrices, flattened into one vector,
when ``<g_b, g_a> < 0`` the conflicting component is removed,
``g_b <- g_b - (<g_b, g_a> / |g_a|^2) g_a``; the update is ``g_a + g_b`` (a plain sum on every
other tensor). Which gradient gives way is task-dependent in the reference:
``projection="final"`` (default; the reference's SST-2, MRPC, RTE, QNLI runs) keeps the
exits' gradient and projects the final loss's, ``projection="exits"`` (its MNLI and QQP runs)
the other way round; ``projection=None`` is "RomeBERT - SD only" (plain backpropagation of the
sum).

Deviations: the reference projects the weight matrices of the encoder layers below the last
(names with ``encoder.layer`` but not ``layer.11``, ``LayerNorm`` or ``bias``); here the
projected set is every weight tensor of two or more dimensions that *both* gradients reach,
embedding tables excepted, which is the same set on BERT with an exit at every layer and
carries over to other backbones and exit placements. The gradients are computed with
``torch.autograd.grad`` and handed to the Trainer as a surrogate loss whose value is the
objective and whose gradient is the regularized one, as ``meta_gf`` does (single-process
training). The reference's ``--ge`` gradient rescaling is not part of the published RomeBERT
runs and is not implemented. Classification only (the reference's regression branch takes a
softmax over a single output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    check_distillation_options,
    distillation_kl,
    exit_task_loss,
    head_parameters,
    register_strategy,
)
from .meta import trainable_parameters, unwrap

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

PROJECTIONS = ("final", "exits", None)
KL_REDUCTIONS = ("mean", "batchmean")


def romebert_losses(
    outputs: ExitOutputs, labels: torch.Tensor, gamma: float = 0.9, temperature: float = 3.0,
    kl_reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_final, L_exits)`` of the module docstring; logits (B, C) per exit, labels (B,).
    The teacher (final exit) is detached inside the KL terms."""
    teacher = outputs.logits[-1]
    final = exit_task_loss(outputs, labels, len(outputs.logits) - 1)
    per_class = 1.0 / teacher.shape[-1] if kl_reduction == "mean" else 1.0
    terms = [
        (1.0 - gamma) * exit_task_loss(outputs, labels, k)
        + gamma * per_class * distillation_kl(z, teacher, temperature)
        for k, z in enumerate(outputs.logits[:-1])
    ]
    return final, torch.stack(terms).sum()


def project_conflict(
    kept: Sequence[torch.Tensor | None],
    projected: Sequence[torch.Tensor | None],
    shared: Sequence[bool],
) -> tuple[list[torch.Tensor | None], bool]:
    """GR: per tensor ``g_a + g_b``, with g_b first stripped of its component against g_a
    over the ``shared`` tensors (flattened together) when the two conflict.

    kept / projected: one gradient per tensor (None: that loss does not reach it).
    shared: per tensor, whether it takes part in the projection (both gradients must be set).
    Returns the combined gradients and whether the two conflicted (``<g_b, g_a> < 0``).
    """
    idx = [i for i, s in enumerate(shared) if s]
    if any(kept[i] is None or projected[i] is None for i in idx):
        raise InputError("a shared tensor needs both gradients")
    coef = None
    if idx:
        a = torch.cat([kept[i].reshape(-1).double() for i in idx])  # type: ignore[union-attr]
        b = torch.cat([projected[i].reshape(-1).double() for i in idx])  # type: ignore[union-attr]
        dot, norm = torch.dot(a, b), torch.dot(a, a)
        if float(dot) < 0 and float(norm) > 0:
            coef = dot / norm
    out: list[torch.Tensor | None] = []
    for i, (ga, gb) in enumerate(zip(kept, projected)):
        if ga is None or gb is None:
            out.append(ga if gb is None else gb)
            continue
        if coef is not None and shared[i]:
            gb = gb - coef.to(gb.dtype) * ga
        out.append(ga + gb)
    return out, coef is not None


class RomeBERTStep:
    """The GR training step: both losses' gradients, projected, as a surrogate loss."""

    def __init__(self, gamma: float, temperature: float, kl_reduction: str,
                 projection: str) -> None:
        self.gamma, self.temperature = gamma, temperature
        self.kl_reduction, self.projection = kl_reduction, projection
        self.conflicts = 0  # steps on which the two gradients conflicted (for inspection)
        self.steps = 0

    @staticmethod
    def projectable(core: nn.Module, params: dict[str, torch.Tensor]) -> list[bool]:
        """Per parameter: a weight matrix (2+ dims) that is not an embedding table."""
        tables = {id(m.weight) for m in core.modules() if isinstance(m, nn.Embedding)}
        return [p.dim() >= 2 and id(p) not in tables for p in params.values()]

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, ExitOutputs]:
        core = unwrap(model)
        params = trainable_parameters(core)
        plist = list(params.values())
        outputs = model(**inputs)
        final, exits = romebert_losses(outputs, labels, self.gamma, self.temperature,
                                       self.kl_reduction)
        g_final = torch.autograd.grad(final, plist, retain_graph=True, allow_unused=True)
        g_exits = torch.autograd.grad(exits, plist, allow_unused=True)
        kept, proj = (g_exits, g_final) if self.projection == "final" else (g_final, g_exits)
        shared = [ok and a is not None and b is not None
                  for ok, a, b in zip(self.projectable(core, params), kept, proj)]
        combined, conflicted = project_conflict(kept, proj, shared)
        self.steps += 1
        self.conflicts += int(conflicted)
        value = (final + exits).detach()
        surrogate = sum((g * p).sum() for g, p in zip(combined, plist) if g is not None)
        if not isinstance(surrogate, torch.Tensor):
            raise ConfigError("romebert: no trainable parameter is reached by the losses")
        # the objective's value, the regularized gradient
        return value + surrogate - surrogate.detach(), outputs


@register_strategy("romebert")
class RomeBERTStrategy(TrainingStrategy):
    tunes_backbone = True
    tasks = ("classification",)  # distillation between class distributions

    def __init__(
        self,
        gamma: float = 0.9,
        temperature: float = 3.0,
        projection: str | None = "final",
        kl_reduction: str = "mean",
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        self.gamma, self.temperature = check_distillation_options(gamma, temperature,
                                                                     name="gamma")
        if projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"kl_reduction must be one of {KL_REDUCTIONS}, "
                              f"got {kl_reduction!r}")
        self.projection, self.kl_reduction = projection, kl_reduction
        self.last_step: RomeBERTStep | None = None

    def loss(self, outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        """The objective ``L_final + L_exits``."""
        final, exits = romebert_losses(outputs, labels, self.gamma, self.temperature,
                                       self.kl_reduction)
        return final + exits

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("romebert needs at least one early exit besides the final one")
        step = None
        if self.projection is not None:
            step = RomeBERTStep(self.gamma, self.temperature, self.kl_reduction,
                                self.projection)
        self.last_step = step
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=self.loss,
                step=step,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "temperature": self.temperature,
            "projection": self.projection,
            "kl_reduction": self.kl_reduction,
            **super().options(),
        }

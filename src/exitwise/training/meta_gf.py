"""``meta_gf``: Meta Gradient Fusion (Sun et al., "Meta-GF: Training Dynamic-Depth Neural
Networks Harmoniously", ECCV 2022).

The exits share the backbone, and their gradients on it conflict. Meta-GF fuses them with
learned weights *per layer*: every parameter tensor n (a layer's weight or bias) gets its own
fusion weight for every exit k that reaches it, and the update uses the weighted average of
the exits' gradients there. Reference: ``SYVAE/MetaGF`` ``M5main_GF.py`` (``adapt_model``: the
per-exit updated weights of every tensor are averaged with ``sigmoid(a_kn) / sum_j
sigmoid(a_jn)`` over the exits j whose loss reaches tensor n, the ``ValidNodeslist``; the
``a_kn`` start at 1 and train with Adam on the held-out loss of the fused model). As a
gradient step this is::

    g_n = sum_{k in R(n)} w_kn g_kn,   w_kn = sigmoid(a_kn) / sum_{j in R(n)} sigmoid(a_jn)

with ``g_kn`` the gradient of exit k's loss on tensor n and ``R(n)`` the exits that reach it
(a head's own tensors are reached by its exit only, so they keep their own gradient).
``granularity="channel"`` gives every output channel (first dimension) its own weight.

Each training step (a custom :attr:`Stage.step`) uses both halves of the batch, as L2W's
reference does (:mod:`exitwise.training.meta`): for (train, meta) = (half 1, half 2), then
(half 2, half 1): the exits' gradients on the training half, a look-ahead ``theta' =
step(theta, g(a))`` with the real optimizer's step and state, the held-out loss ``sum_k
CE_k(theta')`` on the meta half and one Adam step on ``a``. The real update then applies the
fused gradient of the whole batch (each exit's gradient averaged over both halves) with the
updated weights: the returned loss has the value ``sum_k CE_k`` and the fused gradient.

Deviations: the reference runs its fusion once per epoch over per-exit training passes
(Reptile style) with auxiliary losses and an EMA of the fusion weights, and scores the fused
model with SDN's ramped loss weights; here the fusion is meta-learned every step on the
halves' held-out loss ``sum_k CE_k``. The fusion weights are training-time state
(``strategy.last_step.weights()``), not saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)
from .meta import (
    OptimizerWatch,
    check_meta_options,
    functional_forward,
    halves,
    second_order_safe,
    trainable_parameters,
    unwrap,
    virtual_step,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

GRANULARITIES = ("layer", "channel")


def exit_losses(outputs: ExitOutputs, labels: torch.Tensor) -> list[torch.Tensor]:
    return [F.cross_entropy(z.float(), labels) for z in outputs.logits]


def fuse(
    per_exit: Sequence[Sequence[torch.Tensor | None]], weights: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Per tensor n: ``sum_k w_kn g_kn`` over the exits whose gradient is not None.

    per_exit: K lists of one gradient (or None: exit k does not reach the tensor) per tensor.
    weights: per tensor, the (K,) or (K, d0) positive fusion scores ``sigmoid(a)``; they are
    normalised over the reaching exits here.
    """
    out: list[torch.Tensor | None] = []
    for n, scores in enumerate(weights):
        reach = [k for k in range(len(per_exit)) if per_exit[k][n] is not None]
        if not reach:
            out.append(None)
            continue
        s = scores[reach]  # (R,) or (R, d0)
        w = s / s.sum(0, keepdim=True)
        total: torch.Tensor | None = None
        for i, k in enumerate(reach):
            g = per_exit[k][n]
            wi = w[i] if w.dim() == 1 else w[i].reshape((-1,) + (1,) * (g.dim() - 1))
            total = wi * g if total is None else total + wi * g
        out.append(total)
    return out


class MetaGFStep:
    """The meta gradient-fusion step above; owns the fusion logits ``a`` and their optimizer."""

    # Meta-parameters and their optimizer live here, not in the model: they are not
    # checkpointed, so the trainer refuses to resume such a stage mid-way.
    stateful = True

    def __init__(
        self, num_exits: int, progress: TrainingProgress, meta_lr: float,
        inner_lr: float | None, granularity: str,
    ) -> None:
        self.num_exits, self.granularity = num_exits, granularity
        self.progress, self.inner_lr, self.meta_lr = progress, inner_lr, meta_lr
        self.names: list[str] = []
        self.logits = nn.ParameterList()
        self.optimizer: torch.optim.Optimizer | None = None
        self.watch = OptimizerWatch()
        self.meta_losses: list[float] = []

    def _ensure(self, params: dict[str, torch.Tensor]) -> None:
        """Create one fusion logit tensor per trainable tensor (at 1, as the reference)."""
        if self.names == list(params):
            return
        self.names = list(params)
        rows = []
        for p in params.values():
            width = int(p.shape[0]) if self.granularity == "channel" and p.dim() else None
            shape = (self.num_exits,) if width is None else (self.num_exits, width)
            rows.append(nn.Parameter(torch.ones(shape, device=p.device)))
        self.logits = nn.ParameterList(rows)
        self.optimizer = torch.optim.Adam(self.logits.parameters(), lr=self.meta_lr)

    def weights(self) -> list[torch.Tensor]:
        """Per tensor, the (K,) or (K, d0) fusion scores ``sigmoid(a)`` (normalised over the
        exits that reach the tensor when fused)."""
        return [torch.sigmoid(a) for a in self.logits]

    def _per_exit_grads(
        self, losses: Sequence[torch.Tensor], params: dict[str, torch.Tensor]
    ) -> list[list[torch.Tensor | None]]:
        plist = list(params.values())
        return [
            [None if g is None else g.detach() for g in torch.autograd.grad(
                loss, plist, retain_graph=True, allow_unused=True)]
            for loss in losses
        ]

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, ExitOutputs]:
        core = unwrap(model)
        params = trainable_parameters(core)
        self._ensure(params)
        optimizer = None if self.inner_lr is not None else self.watch.watch(params)
        lr = self.inner_lr if self.inner_lr is not None else (self.progress.learning_rate or 1e-3)
        parts = halves(inputs, labels)
        outs = [model(**x) for x, _ in parts]
        losses = [exit_losses(o, y) for o, (_, y) in zip(outs, parts)]
        grads = [self._per_exit_grads(lh, params) for lh in losses]  # [half][exit][tensor]
        metas = []
        for h in range(2):  # (train, meta) = (h, 1 - h)
            fused = fuse(grads[h], self.weights())
            fast = virtual_step(params, fused, optimizer, lr)
            with second_order_safe():
                held = functional_forward(core, fast, parts[1 - h][0])
            meta = torch.stack(exit_losses(held, parts[1 - h][1])).sum()
            assert self.optimizer is not None
            meta_grads = torch.autograd.grad(meta, list(self.logits), allow_unused=True)
            for a, g in zip(self.logits, meta_grads):
                a.grad = None if g is None else g.detach()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            metas.append(float(meta.detach()))
        self.meta_losses.append(sum(metas) / 2)
        # the real update: each exit's whole-batch gradient (the halves' size-weighted mean),
        # fused with the updated weights
        sizes = [int(y.shape[0]) for _, y in parts]
        n = sum(sizes)
        full = [
            [None if grads[0][k][i] is None else
             (sizes[0] * grads[0][k][i] + sizes[1] * grads[1][k][i]) / n
             for i in range(len(params))]
            for k in range(self.num_exits)
        ]
        with torch.no_grad():
            fused = fuse(full, self.weights())
        value = sum((sizes[h] * torch.stack(losses[h]).sum()).detach() for h in range(2)) / n
        surrogate = sum((g * p).sum() for g, p in zip(fused, params.values()) if g is not None)
        loss = value + surrogate - surrogate.detach()  # the value of sum_k CE_k, the fused grad
        joined = ExitOutputs(
            logits=[torch.cat([o.logits[k] for o in outs]) for k in range(self.num_exits)]
        )
        return loss, joined


@register_strategy("meta_gf")
class MetaGFStrategy(TrainingStrategy):
    tunes_backbone = True
    min_batch_rows = 2  # each step cuts the batch in two halves (meta.halves)

    def __init__(
        self,
        meta_learning_rate: float = 1e-2,
        granularity: str = "layer",
        inner_learning_rate: float | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        check_meta_options(meta_learning_rate, inner_learning_rate)
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.meta_learning_rate = float(meta_learning_rate)
        self.granularity = granularity
        self.inner_learning_rate = (
            None if inner_learning_rate is None else float(inner_learning_rate)
        )
        self.last_step: MetaGFStep | None = None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("meta_gf needs at least two exits to fuse")
        progress = TrainingProgress()
        step = MetaGFStep(
            model.num_exits, progress, self.meta_learning_rate, self.inner_learning_rate,
            self.granularity,
        )
        self.last_step = step
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=weighted_exit_loss([1.0] * model.num_exits),
                step=step,
                progress=progress,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "meta_learning_rate": self.meta_learning_rate,
            "granularity": self.granularity,
            "inner_learning_rate": self.inner_learning_rate,
            **super().options(),
        }

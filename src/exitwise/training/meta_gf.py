"""``meta_gf``: Meta Gradient Fusion (Sun et al., "Meta-GF: Training Dynamic-Depth Neural
Networks Harmoniously", ECCV 2022).

The exits share the backbone, and their gradients on it conflict. Meta-GF fuses them with
learned weights: the backbone is updated with ``sum_k w_k g_k`` (``g_k`` = the gradient of exit
k's loss on the backbone), each head with its own loss's gradient. The weights
``w = K * softmax(a)`` (uniform at the start: plain joint training) are meta-learned every
step (a custom :attr:`Stage.step`) on a batch split into a training and a held-out part:

1. per-exit backbone gradients ``g_k`` on the training part;
2. look-ahead ``theta' = theta - lr * sum_k w_k g_k`` (heads: ``- lr * g_head``), the held-out
   loss ``sum_k CE_k(theta')`` (``torch.func.functional_call``), and one Adam step on ``a``
   (``d theta'/d w_k = -lr g_k``, so this is the exact gradient of the held-out loss);
3. the real update: the forward runs with ``grad_scales`` ``(w_k, 1)`` per exit, so the
   gradient exit k sends into the backbone is multiplied by ``w_k`` while heads keep theirs,
   and that loss is handed back to the Trainer.

The fusion weights are training-time state (``strategy.last_step.weights()``), not saved.
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
    check_meta_options,
    functional_forward,
    split_batch,
    trainable_parameters,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def exit_losses(outputs: ExitOutputs, labels: torch.Tensor) -> list[torch.Tensor]:
    return [F.cross_entropy(z.float(), labels) for z in outputs.logits]


class MetaGFStep:
    """The meta gradient-fusion step above; owns the fusion logits ``a`` and their optimizer."""

    # Meta-parameters and their optimizer live here, not in the model: they are not
    # checkpointed, so the trainer refuses to resume such a stage mid-way.
    stateful = True

    def __init__(
        self, num_exits: int, progress: TrainingProgress, meta_lr: float, meta_fraction: float,
        inner_lr: float | None,
    ) -> None:
        self.logits = nn.Parameter(torch.zeros(num_exits))
        self.optimizer = torch.optim.Adam([self.logits], lr=meta_lr)
        self.progress, self.meta_fraction, self.inner_lr = progress, meta_fraction, inner_lr
        self.meta_losses: list[float] = []

    def weights(self) -> torch.Tensor:
        """(K,) fusion weights, mean 1."""
        return self.logits.numel() * torch.softmax(self.logits, 0)

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, ExitOutputs]:
        core = unwrap(model)
        if self.logits.device != labels.device:
            with torch.no_grad():
                self.logits.data = self.logits.data.to(labels.device)
        tr_in, tr_y, me_in, me_y = split_batch(inputs, labels, self.meta_fraction)
        params = trainable_parameters(core)
        bb_names = [n for n in params if n.startswith("backbone.")]
        hd_names = [n for n in params if not n.startswith("backbone.")]
        bb = [params[n] for n in bb_names]
        # 1. per-exit backbone gradients (constants for the meta step) and the heads' gradient
        losses = exit_losses(core(**tr_in), tr_y)
        per_exit = []
        for loss in losses:
            gs = torch.autograd.grad(loss, bb, retain_graph=True, allow_unused=True)
            per_exit.append(
                [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(bb, gs)]
            )
        heads = [params[n] for n in hd_names]
        hg = torch.autograd.grad(torch.stack(losses).sum(), heads, allow_unused=True)
        # 2. look-ahead with the fused backbone gradient; held-out loss; step on the logits
        lr = self.inner_lr if self.inner_lr is not None else (self.progress.learning_rate or 1e-3)
        w = self.weights()
        fast: dict[str, torch.Tensor] = {}
        for i, n in enumerate(bb_names):
            fused = sum(w[k] * per_exit[k][i] for k in range(len(losses)))
            fast[n] = params[n].detach() - lr * fused
        for n, g in zip(hd_names, hg):
            fast[n] = params[n].detach() - (0.0 if g is None else lr * g.detach())
        meta = torch.stack(exit_losses(functional_forward(core, fast, me_in), me_y)).sum()
        (grad_a,) = torch.autograd.grad(meta, [self.logits])
        self.logits.grad = grad_a.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_losses.append(float(meta.detach()))
        # 3. the real update: exit k's backbone gradient scaled by w_k
        w = self.weights().detach()
        outputs = model(**tr_in, grad_scales=[(w[k], 1.0) for k in range(w.numel())])
        return torch.stack(exit_losses(outputs, tr_y)).sum(), outputs


@register_strategy("meta_gf")
class MetaGFStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        meta_learning_rate: float = 1e-2,
        meta_fraction: float = 0.5,
        inner_learning_rate: float | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        check_meta_options(meta_learning_rate, meta_fraction, inner_learning_rate)
        self.meta_learning_rate = float(meta_learning_rate)
        self.meta_fraction = float(meta_fraction)
        self.inner_learning_rate = (
            None if inner_learning_rate is None else float(inner_learning_rate)
        )
        self.last_step: MetaGFStep | None = None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("meta_gf needs at least two exits to fuse")
        progress = TrainingProgress()
        step = MetaGFStep(
            model.num_exits, progress, self.meta_learning_rate, self.meta_fraction,
            self.inner_learning_rate,
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
            "meta_fraction": self.meta_fraction,
            "inner_learning_rate": self.inner_learning_rate,
            **super().options(),
        }

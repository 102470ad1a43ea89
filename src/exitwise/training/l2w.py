"""``l2w``: Learning to Weight Samples for Dynamic Early-exiting Networks (Han et al., ECCV 2022).

At test time the deeper exits only see the examples the shallow ones could not handle, yet
plain training weighs every example equally at every exit. L2W learns per-example, per-exit
loss weights with a small *weight prediction network* (WPN): an MLP that maps an example's
losses at all K exits (K,) to its K weights (sigmoid outputs, rescaled per exit to mean 1 over
the batch, so they only redistribute emphasis among the examples).

Every training step (a custom :attr:`Stage.step`) is a bilevel update on a batch split into a
training part and a meta part (``meta_fraction``):

1. look-ahead: ``theta' = theta - lr * grad_theta mean_i sum_k w_ik(phi) l_ik(theta)`` on the
   training part (``torch.func.functional_call``, graph kept so ``theta'`` depends on phi);
2. meta objective on the meta part with ``theta'``: each meta example is assigned the exit it
   would leave at under budgeted-batch inference with the target exit distribution
   (``exit_distribution``, uniform by default: the budget), and the meta loss is its
   cross-entropy there; one Adam step on phi (``meta_learning_rate``);
3. the real update: ``mean_i sum_k w_ik(phi_new) l_ik(theta)`` on the training part, with the
   weights held fixed, is handed back to the Trainer.

``lr`` of the look-ahead is the Trainer's current learning rate (``inner_learning_rate``
overrides it). The WPN is training-time state: it is not saved with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
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
    budget_assignment,
    check_meta_options,
    exit_distribution,
    functional_forward,
    lookahead,
    per_sample_losses,
    second_order_safe,
    split_batch,
    trainable_parameters,
    unwrap,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


class WeightPredictionNet(nn.Module):
    """(B, K) per-exit losses -> (B, K) weights, each exit's column with mean 1 over the batch."""

    def __init__(self, num_exits: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_exits, hidden), nn.ReLU(), nn.Linear(hidden, num_exits)
        )
        nn.init.zeros_(self.net[2].weight)  # start from uniform weights
        nn.init.zeros_(self.net[2].bias)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.net(losses.detach().float()))
        return w / w.mean(0, keepdim=True).clamp_min(1e-8)


def budget_meta_loss(
    outputs: ExitOutputs, labels: torch.Tensor, shares: torch.Tensor
) -> torch.Tensor:
    """Mean CE of each meta example at the exit budgeted-batch inference sends it to."""
    exit_of = budget_assignment(outputs.logits, shares.to(labels.device))
    losses = per_sample_losses(outputs, labels)  # (B, K)
    return losses.gather(1, exit_of.unsqueeze(1)).mean()


class L2WStep:
    """The bilevel training step above; owns the WPN and its optimizer."""

    # Meta-parameters and their optimizer live here, not in the model: they are not
    # checkpointed, so the trainer refuses to resume such a stage mid-way.
    stateful = True

    def __init__(
        self, num_exits: int, shares: torch.Tensor, progress: TrainingProgress, hidden: int,
        meta_lr: float, meta_fraction: float, inner_lr: float | None,
    ) -> None:
        self.wpn = WeightPredictionNet(num_exits, hidden)
        self.optimizer = torch.optim.Adam(self.wpn.parameters(), lr=meta_lr)
        self.shares, self.progress = shares, progress
        self.meta_fraction, self.inner_lr = meta_fraction, inner_lr
        self.meta_losses: list[float] = []  # one per step, for inspection

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, ExitOutputs]:
        core = unwrap(model)
        device = labels.device
        if next(self.wpn.parameters()).device != device:
            self.wpn.to(device)
        tr_in, tr_y, me_in, me_y = split_batch(inputs, labels, self.meta_fraction)
        params = trainable_parameters(core)
        with second_order_safe():
            outputs = core(**tr_in)
        losses = per_sample_losses(outputs, tr_y)  # (B, K), graph to theta
        # 1. look-ahead theta'(phi)
        inner = (self.wpn(losses) * losses).sum(1).mean()
        grads = torch.autograd.grad(
            inner, list(params.values()), create_graph=True, allow_unused=True
        )
        lr = self.inner_lr if self.inner_lr is not None else (self.progress.learning_rate or 1e-3)
        fast = lookahead(params, grads, lr)
        # 2. meta objective at theta' and one step on phi
        meta = budget_meta_loss(functional_forward(core, fast, me_in), me_y, self.shares)
        phi = list(self.wpn.parameters())
        # retain_graph: the real loss below reuses the forward graph the look-ahead went through
        meta_grads = torch.autograd.grad(meta, phi, retain_graph=True, allow_unused=True)
        for p, g in zip(phi, meta_grads):
            p.grad = None if g is None else g.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meta_losses.append(float(meta.detach()))
        # 3. the real loss, weights fixed at the updated phi
        with torch.no_grad():
            w = self.wpn(losses)
        return (w * losses).sum(1).mean(), outputs


@register_strategy("l2w")
class L2WStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        exit_distribution: Sequence[float] | None = None,
        meta_learning_rate: float = 1e-3,
        meta_fraction: float = 0.5,
        hidden_size: int = 64,
        inner_learning_rate: float | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        check_meta_options(meta_learning_rate, meta_fraction, inner_learning_rate)
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ConfigError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.exit_distribution = (
            None if exit_distribution is None else [float(x) for x in exit_distribution]
        )
        self.meta_learning_rate = float(meta_learning_rate)
        self.meta_fraction = float(meta_fraction)
        self.hidden_size = hidden_size
        self.inner_learning_rate = (
            None if inner_learning_rate is None else float(inner_learning_rate)
        )
        self.last_step: L2WStep | None = None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        shares = exit_distribution(model.num_exits, self.exit_distribution)
        progress = TrainingProgress()
        step = L2WStep(
            model.num_exits, shares, progress, self.hidden_size, self.meta_learning_rate,
            self.meta_fraction, self.inner_learning_rate,
        )
        self.last_step = step
        k = model.num_exits
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=weighted_exit_loss([1.0] * k),  # the objective with uniform weights
                step=step,
                progress=progress,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "exit_distribution": self.exit_distribution,
            "meta_learning_rate": self.meta_learning_rate,
            "meta_fraction": self.meta_fraction,
            "hidden_size": self.hidden_size,
            "inner_learning_rate": self.inner_learning_rate,
            **super().options(),
        }

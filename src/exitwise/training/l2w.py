"""``l2w``: Learning to Weight Samples for Dynamic Early-exiting Networks (Han et al., ECCV 2022).

At test time the deeper exits only see the examples the shallow ones could not handle, yet
plain training weighs every example equally at every exit. L2W learns per-example, per-exit
loss weights with a small *weight prediction network* (WPN). Reference: ``LeapLabTHU/L2W-DEN``
``tools/main_cifar_DDP.py`` (``train``), ``models/weight_predict.py`` (``MLP_tanh``),
``tools/meta.py`` (``MetaSGD``), ``tools/utils.py`` (``calc_target_probs``):

- WPN: ``tanh(Linear(ReLU(Linear(l))))`` maps an example's losses at the K exits (K,) to K
  numbers ``u``; the weights are ``w = 1 + eps (u - mean(u))`` (``constraint="mat"``: the mean
  over the whole (B, K) matrix; ``"row"``: per exit, ``"col"``: per example).
- Each training step splits the batch in halves and runs, for (train, meta) = (half 1,
  half 2), then (half 2, half 1) (:mod:`exitwise.training.meta`):

  1. look-ahead ``theta' = step(theta, grad_theta sum_k mean_i w_ik(phi) l_ik(theta))`` on the
     training half, with the real optimizer's step and state (``MetaSGD``; graph kept, so
     ``theta'`` depends on phi);
  2. meta objective on the meta half at ``theta'``: each meta example goes to the exit that
     budgeted-batch inference would send it to under the target exit distribution (at exit k
     the ``floor(n q_k)`` most confident of the rest), and the meta loss is the sum over exits
     of the mean cross-entropy of the examples sent there; one Adam step on phi
     (``meta_learning_rate``, ``meta_weight_decay``).

  Meta updates happen every ``meta_interval`` optimizer steps.
- The real update: ``sum_k mean_i w_ik l_ik(theta)`` over the *whole* batch (both halves),
  with the weights from the updated WPN held fixed, is handed back to the Trainer.
- Target exit distribution: geometric, ``q_k ∝ ratio^(k+1)`` (``target_ratio``, the
  reference's ``target_p_index / 20``), or ``exit_distribution`` given explicitly.

Defaults as the authors' published run (README): ``epsilon=0.3``, ``constraint="mat"``,
``hidden_size=500``, ``meta_interval=100``, ``meta_learning_rate=1e-4``,
``meta_weight_decay=1e-4``, ``target_ratio=0.75`` (``target_p_index 15``); the WPN reads the
losses (``meta_net_input_type loss``).

Deviations: the reference takes one optimizer step per half (two per batch, the second
look-ahead starting from the first update); here the Trainer takes one step per batch on both
halves, after both meta updates, and both look-aheads start from the same weights. The meta
learning rate is constant (the reference decays it with a cosine). ``meta_interval`` counts
optimizer steps across epochs (the reference counts batches within an epoch). The WPN is
training-time state: it is not saved with the model.
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
    budget_assignment,
    check_meta_options,
    exit_distribution,
    functional_forward,
    halves,
    per_sample_losses,
    second_order_safe,
    trainable_parameters,
    unwrap,
    virtual_step,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

CONSTRAINTS = ("mat", "row", "col")


class WeightPredictionNet(nn.Module):
    """(B, K) per-exit losses -> (B, K) weights ``1 + eps (u - mean(u))``, ``u = tanh(MLP)``."""

    def __init__(self, num_exits: int, hidden: int = 500, epsilon: float = 0.3,
                 constraint: str = "mat") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_exits, hidden), nn.ReLU(), nn.Linear(hidden, num_exits), nn.Tanh()
        )
        self.epsilon, self.constraint = float(epsilon), constraint

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        u = self.net(losses.detach().float())
        if self.constraint == "mat":
            centre = u.mean()
        elif self.constraint == "row":  # the reference's 'row': the mean over examples
            centre = u.mean(0, keepdim=True)
        else:
            centre = u.mean(1, keepdim=True)
        return 1.0 + self.epsilon * (u - centre)


def budget_meta_loss(
    outputs: ExitOutputs, labels: torch.Tensor, shares: torch.Tensor
) -> torch.Tensor:
    """Sum over exits of the mean CE of the meta examples budgeted-batch inference sends
    there (exits that get none add nothing)."""
    exit_of = budget_assignment(outputs.logits, shares.to(labels.device))
    terms = []
    for k, z in enumerate(outputs.logits):
        rows = (exit_of == k).nonzero().squeeze(1)
        if rows.numel():
            terms.append(F.cross_entropy(z.float()[rows], labels[rows]))
    return torch.stack(terms).sum()


class L2WStep:
    """The training step above; owns the WPN and its optimizer."""

    # Meta-parameters and their optimizer live here, not in the model: they are not
    # checkpointed, so the trainer refuses to resume such a stage mid-way.
    stateful = True

    def __init__(
        self, num_exits: int, shares: torch.Tensor, progress: TrainingProgress, hidden: int,
        epsilon: float, constraint: str, meta_lr: float, meta_weight_decay: float,
        meta_interval: int, inner_lr: float | None,
    ) -> None:
        self.wpn = WeightPredictionNet(num_exits, hidden, epsilon, constraint)
        self.optimizer = torch.optim.Adam(
            self.wpn.parameters(), lr=meta_lr, weight_decay=meta_weight_decay
        )
        self.shares, self.progress = shares, progress
        self.meta_interval, self.inner_lr = meta_interval, inner_lr
        self.watch = OptimizerWatch()
        self.meta_losses: list[float] = []  # one per step with a meta update, for inspection

    def meta_update(
        self, core: nn.Module, params: dict[str, torch.Tensor], losses: torch.Tensor,
        meta_in: dict[str, Any], meta_y: torch.Tensor,
    ) -> float:
        """One WPN step from the training half's (B, K) losses (graph to theta) and the meta
        half; returns the meta loss."""
        inner = (self.wpn(losses) * losses).mean(0).sum()
        grads = torch.autograd.grad(
            inner, list(params.values()), create_graph=True, retain_graph=True,
            allow_unused=True,
        )
        lr = self.inner_lr if self.inner_lr is not None else (self.progress.learning_rate or 1e-3)
        optimizer = None if self.inner_lr is not None else self.watch.watch(params)
        fast = virtual_step(params, grads, optimizer, lr)
        meta = budget_meta_loss(functional_forward(core, fast, meta_in), meta_y, self.shares)
        phi = list(self.wpn.parameters())
        meta_grads = torch.autograd.grad(meta, phi, retain_graph=True, allow_unused=True)
        for p, g in zip(phi, meta_grads):
            p.grad = None if g is None else g.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(meta.detach())

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, ExitOutputs]:
        core = unwrap(model)
        if next(self.wpn.parameters()).device != labels.device:
            self.wpn.to(labels.device)
        params = trainable_parameters(core)
        self.watch.watch(params)  # start looking for the Trainer's optimizer
        parts = halves(inputs, labels)
        do_meta = self.progress.step % self.meta_interval == 0
        outs, losses = [], []
        for part_in, _ in parts:
            if do_meta:  # the look-ahead differentiates through this forward's gradient
                with second_order_safe():
                    outs.append(model(**part_in))
            else:
                outs.append(model(**part_in))
        losses = [per_sample_losses(o, y) for o, (_, y) in zip(outs, parts)]  # (B_h, K), graph
        if do_meta:
            metas = [
                self.meta_update(core, params, losses[h], *parts[1 - h]) for h in range(2)
            ]
            self.meta_losses.append(sum(metas) / 2)
        with torch.no_grad():
            weights = [self.wpn(lh) for lh in losses]
        n = int(labels.shape[0])
        # sum_k mean over the whole batch of w * l (the halves' means, weighted by size)
        loss = sum((w * lh).sum(0).sum() for w, lh in zip(weights, losses)) / n
        joined = ExitOutputs(
            logits=[torch.cat([o.logits[k] for o in outs]) for k in range(len(outs[0].logits))]
        )
        return loss, joined


@register_strategy("l2w")
class L2WStrategy(TrainingStrategy):
    tunes_backbone = True
    min_batch_rows = 2  # each step cuts the batch in two halves (meta.halves)

    def __init__(
        self,
        target_ratio: float = 0.75,
        exit_distribution: Sequence[float] | None = None,
        epsilon: float = 0.3,
        constraint: str = "mat",
        meta_interval: int = 100,
        meta_learning_rate: float = 1e-4,
        meta_weight_decay: float = 1e-4,
        hidden_size: int = 500,
        inner_learning_rate: float | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        check_meta_options(meta_learning_rate, inner_learning_rate)
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ConfigError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(meta_interval, int) or meta_interval < 1:
            raise ConfigError(f"meta_interval must be a positive int, got {meta_interval!r}")
        if constraint not in CONSTRAINTS:
            raise ConfigError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
        if not float(epsilon) >= 0 or not float(meta_weight_decay) >= 0:
            raise ConfigError("epsilon and meta_weight_decay must be >= 0")
        if not float(target_ratio) > 0:
            raise ConfigError(f"target_ratio must be > 0, got {target_ratio}")
        self.target_ratio = float(target_ratio)
        self.exit_distribution = (
            None if exit_distribution is None else [float(x) for x in exit_distribution]
        )
        self.epsilon, self.constraint = float(epsilon), constraint
        self.meta_interval = meta_interval
        self.meta_learning_rate = float(meta_learning_rate)
        self.meta_weight_decay = float(meta_weight_decay)
        self.hidden_size = hidden_size
        self.inner_learning_rate = (
            None if inner_learning_rate is None else float(inner_learning_rate)
        )
        self.last_step: L2WStep | None = None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        shares = exit_distribution(model.num_exits, self.exit_distribution, self.target_ratio)
        progress = TrainingProgress()
        step = L2WStep(
            model.num_exits, shares, progress, self.hidden_size, self.epsilon, self.constraint,
            self.meta_learning_rate, self.meta_weight_decay, self.meta_interval,
            self.inner_learning_rate,
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
            "target_ratio": self.target_ratio,
            "exit_distribution": self.exit_distribution,
            "epsilon": self.epsilon,
            "constraint": self.constraint,
            "meta_interval": self.meta_interval,
            "meta_learning_rate": self.meta_learning_rate,
            "meta_weight_decay": self.meta_weight_decay,
            "hidden_size": self.hidden_size,
            "inner_learning_rate": self.inner_learning_rate,
            **super().options(),
        }

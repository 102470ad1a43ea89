"""``leebert``: LeeBERT (Zhu, "LeeBERT: Learned Early Exit for BERT with Cross-Level
Optimization", ACL 2021): mutual distillation among the exits, with the weights of the
distillation terms learned by cross-level (bi-level) optimization.

No reference code: none is listed for the paper and none was found; nor could the paper's
full text be consulted here. The recipe follows what the paper's abstract and its published
summaries state: (1) every exit learns from every other exit, not only from the last one;
(2) the weights of the distillation terms are learned along with the model, as a bi-level
problem (model weights on one split of the training data, loss weights on the other); (3) the
cross-level optimization (CLO) draws the loss weights' gradient from both splits. Everything
those statements leave open is a choice made here, each one stated:

- Objective at model weights theta and loss weights w (a K x K table, diagonal unused)::

      L(theta, w) = sum_k CE(z_k, y)
                    + sum_k 1/(K-1) sum_{j != k} w_kj T^2 KL(softmax(z_j/T) || softmax(z_k/T))

  exit k is the student of term (k, j) and exit j its (detached) teacher, as in deep mutual
  learning; the KL is :func:`~exitwise.training.base.distillation_kl` (batch mean). w starts
  at 1 (each student's distillation weighs as much as its cross-entropy), ``temperature``
  defaults to 1, and w is kept non-negative (clipped at 0 after every update).
- Bi-level step, with the machinery of :mod:`exitwise.training.meta` (as ``l2w`` and
  ``meta_gf``): each batch is cut in two halves; for (train, held-out) = (half 1, half 2), then
  (half 2, half 1): a look-ahead ``theta' = step(theta, grad_theta L(theta, w))`` on the
  training half with the Trainer's own optimizer step (``meta.virtual_step``), the held-out
  objective ``sum_k CE(z_k(theta'), y)`` on the other half, and
  one Adam step of w on its gradient. Both halves thus give w its gradient and both train the
  model: the real update is ``L(theta, w)`` over the whole batch with the updated w.
- Meta updates every ``meta_interval`` optimizer steps (default every step); Adam at
  ``meta_learning_rate`` (1e-3).

The learned weights are training-time state (``strategy.last_step.weights``), not saved with
the model (a stage with them cannot resume mid-way, as ``l2w``). Classification only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    distillation_kl,
    head_parameters,
    register_strategy,
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


def mutual_distillation_loss(
    outputs: ExitOutputs, weights: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``sum_k 1/(K-1) sum_{j != k} w_kj T^2 KL(p_j^T || p_k^T)``: exit k the student, exit j
    the detached teacher; logits (B, C) per exit, weights (K, K) (diagonal ignored)."""
    k_total = len(outputs.logits)
    if weights.shape != (k_total, k_total):
        raise InputError(f"distillation weights of shape {tuple(weights.shape)} for "
                         f"{k_total} exits; need ({k_total}, {k_total})")
    terms = [weights[k, j] * distillation_kl(outputs.logits[k], outputs.logits[j], temperature)
             for k in range(k_total) for j in range(k_total) if j != k]
    return torch.stack(terms).sum() / (k_total - 1)


def exits_cross_entropy(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    """``sum_k CE(z_k, y)`` (each a batch mean, float32): the held-out objective."""
    return torch.stack([F.cross_entropy(z.float(), labels) for z in outputs.logits]).sum()


def leebert_loss(
    outputs: ExitOutputs, labels: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The training objective ``L(theta, w)`` of the module docstring."""
    return exits_cross_entropy(outputs, labels) + mutual_distillation_loss(
        outputs, weights, temperature)


class LeeBERTStep:
    """The cross-level step; owns the distillation weights w and their Adam optimizer."""

    # Meta-parameters and their optimizer live here, not in the model: they are not
    # checkpointed, so the trainer refuses to resume such a stage mid-way.
    stateful = True

    def __init__(self, num_exits: int, progress: TrainingProgress, temperature: float,
                 meta_lr: float, meta_interval: int, inner_lr: float | None) -> None:
        self.weights = nn.Parameter(torch.ones(num_exits, num_exits))
        self.optimizer = torch.optim.Adam([self.weights], lr=meta_lr)
        self.temperature, self.progress = temperature, progress
        self.meta_interval, self.inner_lr = meta_interval, inner_lr
        self.watch = OptimizerWatch()
        self.meta_losses: list[float] = []  # one per step with a meta update, for inspection

    def meta_gradient(
        self, core: nn.Module, params: dict[str, torch.Tensor], train_out: ExitOutputs,
        train_y: torch.Tensor, meta_in: dict[str, Any], meta_y: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(held-out objective at the look-ahead, its (K, K) gradient in w) for one
        (training half, held-out half) pair; ``train_out`` keeps its graph to theta."""
        inner = leebert_loss(train_out, train_y, self.weights, self.temperature)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True,
                                    retain_graph=True, allow_unused=True)
        lr = self.inner_lr if self.inner_lr is not None else (self.progress.learning_rate or 1e-3)
        optimizer = None if self.inner_lr is not None else self.watch.watch(params)
        fast = virtual_step(params, grads, optimizer, lr)
        with second_order_safe():
            held = exits_cross_entropy(functional_forward(core, fast, meta_in), meta_y)
        (grad,) = torch.autograd.grad(held, [self.weights], retain_graph=True)
        return held.detach(), grad

    def meta_update(self, *args: Any) -> float:
        """One Adam step of w (arguments of :meth:`meta_gradient`); returns the held-out
        objective. w stays non-negative."""
        held, grad = self.meta_gradient(*args)
        self.weights.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.weights.clamp_(min=0.0)
        return float(held)

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, ExitOutputs]:
        core = unwrap(model)
        if self.weights.device != labels.device:
            self.weights.data = self.weights.data.to(labels.device)
        params = trainable_parameters(core)
        self.watch.watch(params)  # start looking for the Trainer's optimizer
        parts = halves(inputs, labels)
        do_meta = self.progress.step % self.meta_interval == 0
        outs = []
        for part_in, _ in parts:
            if do_meta:  # the look-ahead differentiates through this forward's gradient
                with second_order_safe():
                    outs.append(model(**part_in))
            else:
                outs.append(model(**part_in))
        if do_meta:
            held = [self.meta_update(core, params, outs[h], parts[h][1], *parts[1 - h])
                    for h in range(2)]
            self.meta_losses.append(sum(held) / 2)
        w = self.weights.detach()
        sizes = [int(y.shape[0]) for _, y in parts]
        # the objective over the whole batch: the halves' means weighted by their sizes
        loss = sum(n * leebert_loss(o, y, w, self.temperature)
                   for n, o, (_, y) in zip(sizes, outs, parts)) / sum(sizes)
        joined = ExitOutputs(
            logits=[torch.cat([o.logits[k] for o in outs]) for k in range(len(outs[0].logits))]
        )
        return loss, joined


@register_strategy("leebert")
class LeeBERTStrategy(TrainingStrategy):
    tunes_backbone = True
    min_batch_rows = 2  # each step cuts the batch in two halves (meta.halves)
    tasks = ("classification",)  # distillation between class distributions

    def __init__(
        self,
        temperature: float = 1.0,
        meta_learning_rate: float = 1e-3,
        meta_interval: int = 1,
        inner_learning_rate: float | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        check_meta_options(meta_learning_rate, inner_learning_rate)
        if not float(temperature) > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not isinstance(meta_interval, int) or meta_interval < 1:
            raise ConfigError(f"meta_interval must be a positive int, got {meta_interval!r}")
        self.temperature = float(temperature)
        self.meta_learning_rate = float(meta_learning_rate)
        self.meta_interval = meta_interval
        self.inner_learning_rate = (
            None if inner_learning_rate is None else float(inner_learning_rate)
        )
        self.last_step: LeeBERTStep | None = None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("leebert needs at least two exits to distil between")
        progress = TrainingProgress()
        step = LeeBERTStep(model.num_exits, progress, self.temperature,
                           self.meta_learning_rate, self.meta_interval,
                           self.inner_learning_rate)
        self.last_step = step

        def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
            # the objective with the weights learned so far
            return leebert_loss(outputs, labels, step.weights.detach(), self.temperature)

        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=loss,
                step=step,
                progress=progress,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "meta_learning_rate": self.meta_learning_rate,
            "meta_interval": self.meta_interval,
            "inner_learning_rate": self.inner_learning_rate,
            **super().options(),
        }

"""``elbert``: ELBERT's training with learned exit weights (Xie et al., "ELBERT: Fast ALBERT
with Confidence-Window Based Early Exit", ICASSP 2021; the reference's default
``weight_name = "dyn"``).

The backbone and every exit train together on ``sum_k w_k L_k`` (cross-entropy, or MSE for a
regression output), where for the E - 1 internal exits ``w_k = sigmoid(t_k)`` with learned
logits ``t_k`` (initialised to ``weight_init`` = 4, so every weight starts near 1), and the
final exit takes the rest of a fixed total, ``w_{E-1} = E - sum_{k<E-1} w_k`` (so it is
always at least 1). The logits are learned by gradient descent on the same objective, so
``dL/dt_k = sigmoid'(t_k) (L_k - L_{E-1})``: an internal exit whose loss is above the final
exit's loses weight to the final exit, and one below gains.

Reference: ``shakeley/ELBERT``: ``test_ver/modeling_albert.py``, ``AlbertExitForCls.__init__``
(``W`` = ``w_init`` per internal exit, ``M = num_exit + 1``) and ``AlbertExitForCls.forward``
(``exit_weight_lst = sigmoid(W)``, ``ori_weight = M - exit_weight_lst.sum()``, the weighted sum
of the exits' CrossEntropy / MSE losses); ``run_glue.py``, ``train``: ``W`` joins the AdamW
optimizer as its own parameter group at ``lr = w_lr`` after the learning-rate schedule was
built, so its learning rate stays constant, and it is neither decayed nor clipped. Its
shipped ``config.json`` sets ``w_init = 4`` and ``w_lr = 1e-2``, the defaults here.

Deviations:

- The logits step with their own Adam (betas 0.9 / 0.999, eps 1e-8, no weight decay: the
  reference's AdamW settings for that group), inside the training step, on the exact gradient
  above computed from this batch's losses; the model's loss of the batch uses the weights from
  before that step, as in the reference, where one ``optimizer.step()`` moves both. With
  gradient accumulation the reference steps ``W`` once per accumulated batch; here once per
  micro-batch.
- Exits may sit at any subset of layers (the reference has one per layer, or per group of
  layers); E counts the exits.
- As in the reference, the weights are training-time state and not saved with the model
  (``strategy.last_step.weights``); a stage with them cannot resume mid-way (as ``l2w``).

Pair with the ``elbert`` exit policy (:mod:`exitwise.policies.elbert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    exit_task_losses,
    head_parameters,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def elbert_weights(logits: torch.Tensor) -> torch.Tensor:
    """(E-1,) internal-exit logits t -> (E,) weights ``[sigmoid(t), E - sum sigmoid(t)]``."""
    inner = torch.sigmoid(logits)
    return torch.cat([inner, (inner.numel() + 1 - inner.sum()).reshape(1)])


def elbert_loss(outputs: ExitOutputs, labels: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
    """``sum_k weights[k] * L_k`` over the E exits (cross-entropy, or MSE for (B, 1))."""
    if weights.numel() != len(outputs.logits):
        raise ConfigError(f"{weights.numel()} ELBERT weights for {len(outputs.logits)} exits")
    losses = exit_task_losses(outputs, labels)
    return (weights.to(device=losses.device, dtype=losses.dtype) * losses).sum()


class ELBERTStep:
    """One training step: the model's loss with the current weights, then one Adam step of
    the weight logits on ``d(sum_k w_k L_k)/dt`` with the losses held fixed."""

    stateful = True  # the logits and their Adam moments live outside the model

    def __init__(self, num_exits: int, weight_init: float, learning_rate: float) -> None:
        self.logits = torch.full((num_exits - 1,), float(weight_init), requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=learning_rate, betas=(0.9, 0.999),
                                          eps=1e-8, weight_decay=0.0)

    @property
    def weights(self) -> list[float]:
        """The E exit weights now (internal exits first, the final exit last)."""
        return elbert_weights(self.logits.detach()).tolist()

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor
                 ) -> tuple[torch.Tensor, ExitOutputs]:
        outputs = model(**inputs)
        losses = exit_task_losses(outputs, labels)
        weights = elbert_weights(self.logits.detach())
        loss = (weights.to(device=losses.device, dtype=losses.dtype) * losses).sum()
        # the weights' step: the same objective, the losses as constants; the logits and
        # their Adam moments stay on the CPU (E - 1 numbers), the losses come to them
        self.optimizer.zero_grad(set_to_none=True)
        (elbert_weights(self.logits) * losses.detach().float().cpu()).sum().backward()
        self.optimizer.step()
        return loss, outputs


@register_strategy("elbert")
class ELBERTStrategy(TrainingStrategy):
    tunes_backbone = True
    exit_policy = "elbert"
    tasks = ("classification", "regression")  # the reference has both losses

    def __init__(
        self,
        weight_init: float = 4.0,
        weight_learning_rate: float = 1e-2,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if not isinstance(weight_init, (int, float)) or isinstance(weight_init, bool):
            raise ConfigError(f"weight_init must be a number, got {weight_init!r}")
        if (not isinstance(weight_learning_rate, (int, float))
                or isinstance(weight_learning_rate, bool) or not weight_learning_rate >= 0):
            raise ConfigError(f"weight_learning_rate must be >= 0, got {weight_learning_rate!r}")
        self.weight_init = float(weight_init)
        self.weight_learning_rate = float(weight_learning_rate)
        self.last_step: ELBERTStep | None = None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("elbert learns the weights of internal exits against the final "
                              "one: it needs at least two exits")
        step = ELBERTStep(model.num_exits, self.weight_init, self.weight_learning_rate)
        self.last_step = step

        def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
            # the objective with the weights learned so far
            return elbert_loss(outputs, labels, elbert_weights(step.logits.detach()))

        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=loss,
                step=step,
                progress=TrainingProgress(),
            )
        ]

    def options(self) -> dict[str, Any]:
        return {"weight_init": self.weight_init,
                "weight_learning_rate": self.weight_learning_rate, **super().options()}

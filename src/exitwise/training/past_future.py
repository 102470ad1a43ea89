"""``past_future``: training of the Global Past-Future early exit (Liao et al., NAACL 2021;
the paper's full text was not at hand, the authors' code is followed): every exit's task loss
plus the imitation loss that teaches each exit to predict the states of the exits after it.

Reference: ``lancopku/Early-Exit``, ``model/modeling_bert.py``,
``BertForSequenceClassification.forward`` (the loss) and ``BertModel.forward`` (the targets and
the lower-layer freezing). With E exits, exit k's logits z_k, its pooled state s_k (the
``past_future`` head's feature) and its imitations ``s^_{k->j}`` of the exits j > k:

- task loss ``L_task = sum_k w_k CE(z_k, y)`` with ``w_k = depth_k / sum_j depth_j`` (the
  reference's ``(i + 1)``-weighted average; ``weights=`` takes any
  :mod:`exitwise.training.schedules` spec);
- imitation loss ``L_imit = mean_{k < E-1} mean_{b, j > k} (1 - cos(s^_{k->j}, sg(s_j)))``, the
  reference's ``CosineEmbeddingLoss`` with target 1 per source exit, averaged over the source
  exits; the real states are detached (targets only), while the imitation's gradient reaches
  the imitators, exit k's pooler and the backbone below it;
- ``loss = (L_task + L_imit) / 2``.

``freeze_lower_layers = F`` (the reference's ``--freezed_lower_layer``, 0 by default there; its
GLUE scripts use 1 to 3): in each training step, independently at every exit within the first
F layers, with probability ``1 - step / max_steps`` no gradient flows into the backbone at that
point (neither from the exit nor from the deeper layers), as the reference detaches the
encoder output of those layers; applied through ``MultiExitModel.forward(grad_scales=...)``.

Exit with the ``entropy`` policy (the reference exits when the prediction entropy falls below
its threshold). Every exit must carry the ``past_future`` head.

Deviations: the reference has an exit after every layer; here exits may sit at any layers
(the weights use the exits' depths; the freezing acts at the exits within the first F layers,
the same as the reference when every layer has an exit). The reference raises
NotImplementedError for regression, so this strategy is for classification only. The
reference counts its freezing schedule in forward passes; here in optimizer steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from ..heads.past_future import PastFutureHead
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    exit_cross_entropy,
    head_parameters,
    register_strategy,
)
from .schedules import WeightSpec, exit_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def imitation_loss(imitated: Sequence[torch.Tensor], states: Sequence[torch.Tensor]
                   ) -> torch.Tensor:
    """``mean_k mean_{b, j} (1 - cos(imitated[k][b, j], states[k + 1 + j][b]))``.

    imitated: for each source exit k = 0..E-2, (B, E-1-k, D) its imitations of exits k+1..E-1.
    states: the E real states (B, D); detached here (they are targets only).
    """
    if len(imitated) != len(states) - 1 or not imitated:
        raise InputError(f"{len(imitated)} imitation sets for {len(states)} exits; need one per "
                         "exit but the last, and at least two exits")
    terms = []
    for k, guess in enumerate(imitated):
        target = torch.stack([s.detach() for s in states[k + 1:]], dim=1)  # (B, E-1-k, D)
        if guess.shape != target.shape:
            raise InputError(f"exit {k} imitates shape {tuple(guess.shape)}, the later exits' "
                             f"states are {tuple(target.shape)}")
        cos = F.cosine_similarity(guess.float(), target.float(), dim=-1)  # (B, E-1-k)
        terms.append((1.0 - cos).mean())
    return torch.stack(terms).mean()


def past_future_loss(outputs: ExitOutputs, labels: torch.Tensor,
                     imitated: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``(sum_k w_k CE(z_k, y) + imitation_loss(imitated, states)) / 2``; the states are
    ``outputs.features`` (forward with ``return_features=True``)."""
    if outputs.features is None or any(f is None for f in outputs.features):
        raise InputError("the past_future loss needs the exits' states: run the model with "
                         "return_features=True on past_future heads")
    if len(weights) != len(outputs.logits):
        raise ConfigError(f"{len(weights)} exit weights for {len(outputs.logits)} exits")
    task = torch.stack([w * exit_cross_entropy(outputs, labels, k)
                        for k, w in enumerate(weights) if w]).sum()
    return (task + imitation_loss(imitated, list(outputs.features))) / 2


def _check_heads(model: MultiExitModel) -> list[PastFutureHead]:
    heads = list(model.heads)
    wrong = [k for k, h in enumerate(heads) if not isinstance(h, PastFutureHead)]
    if wrong:
        kinds = [type(heads[k]).registered_name for k in wrong]
        raise ConfigError(
            f"the past_future strategy trains past_future heads at every exit; exits {wrong} "
            f"have {kinds} (attach with head='past_future', and final_head='past_future' on a "
            "model that has its own classifier; on the command line --head past_future, "
            "and --final-head past_future)"
        )
    if len(heads) < 2:
        raise ConfigError("past_future needs at least two exits (one to imitate the other)")
    return heads  # type: ignore[return-value]


class FreezeLowerStep:
    """One training step with the reference's random lower-layer freezing: at each exit
    ``k`` in ``lower`` the backbone gets no gradient with probability ``1 - progress``."""

    def __init__(self, num_exits: int, lower: list[int], progress: TrainingProgress,
                 loss: Any) -> None:
        self.num_exits, self.lower, self.progress, self.loss = num_exits, lower, progress, loss

    def scales(self) -> list[tuple[float, float]]:
        keep = 1.0 - (self.progress.fraction or 0.0)  # probability of cutting the gradient
        cut = (torch.rand(len(self.lower)) < keep).tolist()
        pairs = [(1.0, 1.0)] * self.num_exits
        for k, c in zip(self.lower, cut):
            if c:
                pairs[k] = (0.0, 0.0)
        return pairs

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor
                 ) -> tuple[torch.Tensor, ExitOutputs]:
        outputs = model(**inputs, return_features=True, grad_scales=self.scales())
        return self.loss(outputs, labels), outputs


@register_strategy("past_future")
class PastFutureStrategy(TrainingStrategy):
    tunes_backbone = True
    tasks = ("classification",)  # the reference raises NotImplementedError for regression

    def __init__(
        self,
        weights: WeightSpec = "depth",
        freeze_lower_layers: int = 0,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if (not isinstance(freeze_lower_layers, int) or isinstance(freeze_lower_layers, bool)
                or freeze_lower_layers < 0):
            raise ConfigError(
                f"freeze_lower_layers must be an int >= 0, got {freeze_lower_layers!r}")
        self.weights = weights if isinstance(weights, str) else [float(w) for w in weights]
        self.freeze_lower_layers = freeze_lower_layers

    def check(self, model: MultiExitModel) -> None:
        _check_heads(model)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        heads = _check_heads(model)
        w = exit_weights(self.weights, model.exit_layers)

        def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
            states = outputs.features or []
            if len(states) != len(heads) or any(s is None for s in states):
                raise InputError("the past_future loss needs every exit's state "
                                 "(forward with return_features=True)")
            imitated = [heads[k].imitate(states[k]) for k in range(len(heads) - 1)]
            return past_future_loss(outputs, labels, imitated, w)

        progress = TrainingProgress()
        lower = [k for k, d in enumerate(model.exit_layers) if d <= self.freeze_lower_layers]
        step = FreezeLowerStep(model.num_exits, lower, progress, loss) if lower else None
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=loss,
                forward_kwargs={"return_features": True},
                step=step,
                progress=progress,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {"weights": self.weights, "freeze_lower_layers": self.freeze_lower_layers,
                **super().options()}

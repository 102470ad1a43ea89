"""``ensemble_ic``: training the exits as an ensemble with an accuracy and a diversity term
(Sun et al. 2021, "Early Exiting with Ensemble Internal Classifiers", arXiv 2105.13792, the
training objective of its method section). Pair it with the ``voting`` exit policy.

    loss = sum_k w_k CE(z_k, y)  -  diversity_weight * D,
    D    = 1 / (K (K - 1)) * sum_{i != j} KL(q_i || q_j)        (batch means)

over the K exits (logits z_k (B, C)), where q_k is exit k's softmax, over all classes
(``diversity="full"``, the default) or over the wrong classes only, renormalised with the
label's class removed (``diversity="non_target"``). ``w`` is an exit weight schedule as in
``joint`` (``weights="uniform"`` by default: the mean of the exits' cross-entropies, i.e.
the prior work's sum divided by K, which also scales ``diversity_weight`` by K relative to a
summed objective). The backbone and every head train in one stage.

Reference: the authors released no code (none is linked from the paper's arXiv page or from
their ``txsun1997/awesome-early-exiting`` list, and none is in the indexed repositories), and
the paper's body, which holds the exact diversity term and its weight, could not be read where
this was written. What is used of the paper is its abstract: the objective, derived from
ensemble learning and information theory, "consists of two terms: one for accuracy and the
other for the diversity of the internal classifiers", and the accuracy term is "exactly" the
objective of prior work (the exits' summed cross-entropies). The diversity term above (mean
pairwise KL between the exits' predicted distributions, subtracted so that training makes them
disagree), its ``non_target`` variant and the default ``diversity_weight = 0.1`` are this
module's reconstruction, not the paper's equations; check them against the paper before citing
results. In both variants D is unbounded above, so the loss is unbounded below (an exit can push a
wrong class's probability towards 0 where another exit keeps it): keep ``diversity_weight``
small.

``non_target`` needs at least three classes: with two, the wrong-class distribution is a
single class and its divergence is always 0 (a ConfigError says so).

Classification only (divergences between class distributions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import (
    LossFn,
    Stage,
    TrainingStrategy,
    backbone_parameters,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)
from .schedules import WeightSpec, exit_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

DIVERSITIES = ("full", "non_target")


def wrong_class_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, C) logits, (B,) labels -> (B, C-1) log-softmax over the classes other than the label
    (the label's column removed, the others in their order)."""
    b, c = logits.shape
    keep = ~F.one_hot(labels.long(), c).bool()
    return torch.log_softmax(logits.float()[keep].view(b, c - 1), dim=-1)


def exit_diversity(
    outputs: ExitOutputs, labels: torch.Tensor, diversity: str = "full"
) -> torch.Tensor:
    """``D``: the mean over ordered exit pairs i != j of the batch-mean ``KL(q_i || q_j)``."""
    if diversity == "full":
        logq = [torch.log_softmax(z.float(), dim=-1) for z in outputs.logits]
    elif diversity == "non_target":
        logq = [wrong_class_logp(z, labels) for z in outputs.logits]
    else:
        raise ConfigError(f"ensemble_ic: diversity must be one of {', '.join(DIVERSITIES)}, "
                          f"got {diversity!r}")
    k = len(logq)
    if k < 2:
        raise ConfigError("ensemble_ic: the diversity term needs at least two exits")
    # kl_div(input=log q_j, target=log q_i) = sum_c q_i (log q_i - log q_j), batch mean
    pairs = [F.kl_div(logq[j], logq[i], log_target=True, reduction="batchmean")
             for i in range(k) for j in range(k) if i != j]
    return torch.stack(pairs).sum() / (k * (k - 1))


def ensemble_ic_loss(
    weights: Sequence[float], diversity_weight: float, diversity: str = "full"
) -> LossFn:
    """``sum_k w_k CE_k - diversity_weight * D`` (see the module docstring)."""
    accuracy = weighted_exit_loss(weights)

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        total = accuracy(outputs, labels)
        if diversity_weight:
            total = total - diversity_weight * exit_diversity(outputs, labels, diversity)
        return total

    return loss


@register_strategy("ensemble_ic")
class EnsembleICStrategy(TrainingStrategy):
    tunes_backbone = True
    exit_policy = "voting"
    tasks = ("classification",)  # divergences between class distributions

    def __init__(
        self,
        diversity_weight: float = 0.1,
        diversity: str = "full",
        weights: WeightSpec = "uniform",
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if diversity not in DIVERSITIES:
            raise ConfigError(f"ensemble_ic: diversity must be one of {', '.join(DIVERSITIES)}, "
                              f"got {diversity!r}")
        try:
            lam = float(diversity_weight)
        except (TypeError, ValueError):
            lam = float("nan")
        if not lam >= 0.0 or lam == float("inf"):
            raise ConfigError(f"ensemble_ic: diversity_weight must be a finite number >= 0, "
                              f"got {diversity_weight!r}")
        self.diversity_weight = lam
        self.diversity = diversity
        self.weights = weights if isinstance(weights, str) else [float(w) for w in weights]

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.task != "classification":
            raise ConfigError("ensemble_ic trains classifiers (its diversity term compares class "
                              "distributions); this model is a regression model")
        if model.num_exits < 2:
            raise ConfigError("ensemble_ic needs at least two exits to form an ensemble")
        if self.diversity == "non_target" and model.num_labels < 3:
            raise ConfigError(
                f"ensemble_ic: diversity='non_target' needs at least 3 classes (this model has "
                f"{model.num_labels}: one wrong class, whose divergence is always 0); use "
                "diversity='full'"
            )
        w = exit_weights(self.weights, model.exit_layers)
        return [
            Stage(
                name="stage-1",
                # The diversity term reaches every head, so every head trains.
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=ensemble_ic_loss(w, self.diversity_weight, self.diversity),
            )
        ]

    def options(self) -> dict[str, Any]:
        return {"diversity_weight": self.diversity_weight, "diversity": self.diversity,
                "weights": self.weights, **super().options()}

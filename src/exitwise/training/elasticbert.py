"""``elasticbert``: ElasticBERT's multi-exit fine-tuning (Liu et al., NAACL 2022, "Towards
Efficient NLP: A Standard Evaluation and A Strong Baseline", the ElasticBERT section:
multi-exit training with gradient equilibrium, after Li et al., ICCV 2019, IMTA).

Every exit trains on its own loss and the losses are summed; the backward pass is rescaled
where each exit reads the trunk so that the layers below exit k receive the *mean*, not the
sum, of the gradients of the exits k..K-1 that sit on top of them::

    loss = sum_k L_k            (cross-entropy, or MSE for a regression model)
    grad(head k)                           = dL_k / d head_k
    grad(layers between exits k-1 and k)   = 1/(K-k) * sum_{j >= k} dL_j / d theta

(the embeddings count as below exit 0: they get the mean over all K exits).

Reference: fastnlp/ElasticBERT, ``finetune-dynamic/models/modeling_elasticbert_entropy.py``
(the same rescaling in ``finetune-static/models/modeling_elasticbert.py``'s encoder):
``GradientRescaleFunction`` (identity forward, gradient times a weight), applied in training
after layer i of L as ``gradient_rescale(h, 1/(L-i))`` before the exit's pooler reads ``h`` and
``gradient_rescale(h, L-i-1)`` on the trunk after it; ``ElasticBertForSequenceClassification``
sums every exit's ``CrossEntropyLoss`` (``MSELoss`` when ``num_labels == 1``) without weights.
Forward values do not change.

The chained pair (1/(L-i), then L-i-1 on the trunk) is
:func:`~exitwise.training.base.gradient_equilibrium_scales`' unchained pair
(1/(K-k), (K-k-1)/(K-k)) applied to the unscaled trunk by ``MultiExitModel.forward``; the
reference has an exit after every layer (or after each of its top ``num_output_layers``
layers), so L-i is the number of exits at or above layer i, which is K-k here for any exit
placement.

Use ``head="pooler"`` for the reference's exit (a pooler per exit: dense + tanh on [CLS],
dropout, linear).

Deviations: ElasticBERT is also a pre-trained checkpoint (every layer pre-trained with MLM and
SOP heads); this strategy is only its fine-tuning recipe, for any backbone exitwise wraps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    gradient_equilibrium_scales,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


@register_strategy("elasticbert")
class ElasticBERTStrategy(TrainingStrategy):
    """One stage: backbone and every head on ``sum_k L_k`` with gradient equilibrium."""

    tunes_backbone = True
    tasks = ("classification", "regression")

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=weighted_exit_loss([1.0] * model.num_exits),  # the reference's plain sum
                forward_kwargs={"grad_scales": gradient_equilibrium_scales(model.num_exits)},
            )
        ]

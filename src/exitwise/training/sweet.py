"""``sweet``: Separating Weights in Early-Exit Transformers (Rotem et al., ACL 2023, "Finding
the SWEET Spot: Analysis and Improvement of Adaptive Inference in Low Resource Settings", the
section that introduces SWEET).

Every exit's loss is summed, but each backbone layer is updated by one exit only: the *next*
exit at or above it. With exits at depths d_0 < d_1 < ... < d_{K-1}, the blocks d_{k-1}+1 ..
d_k (and, for k = 0, the embeddings) receive the gradient of L_k alone::

    loss = sum_k L_k            (cross-entropy, or MSE for a regression model)
    grad(theta in segment k) = dL_k / d theta

Reference: the authors' code (schwartz-lab-NLP/SWEET,
``transformers/src/transformers/models/bert/modeling_bert.py``,
``BertForSequenceClassification.forward``; the DeBERTa twin in
``code/models/deberta/modeling_deberta.py``): the encoder runs segment by segment, each exit's
classifier reads its segment's output with gradient, and with ``config.SWEET`` (DeBERTa:
``freeze_previous_layers``) the hidden state handed to the next segment is ``.detach()``-ed.
The loss is ``MultiExitCrossEntropyLoss`` (``code/utils/losses.py``): the plain, unweighted sum
of every exit's mean cross-entropy.

Here the same cut is :meth:`MultiExitModel.forward`'s ``grad_scales``: at every exit the pair
(head path, trunk path) is (1, 0), so the exit's head sends its gradient into the layers below
it, while the gradient of every deeper exit stops at that point. This is exactly the rule above:
a parameter in segment k lies on the paths of exits k, k+1, ...; the paths of exits j > k cross
exit k's trunk point (scale 0), the path of exit k does not. The embeddings sit below the first
exit and get L_0's gradient only. The final exit, a fresh head or the model's own classifier
(``native``), gets only its own loss, like any exit; its pooler / classifier are read by no
other exit.

Use ``head="pooler"`` for the reference's exit (dense + tanh on [CLS], dropout, linear).

Deviations:

- The reference's exits share one pooler (``BertModel.pooler``, DeBERTa's ``ContextPooler``)
  and only have their own final linear layer, so that pooler gets gradient from every exit;
  exitwise's pooler heads each own their pooler, so the separation is complete there.
- The reference's regression branch (``num_labels == 1``) computes the MSE of the last exit
  only (``logits`` of the last loop iteration), so the earlier exits do not train at all; here
  every exit's MSE is in the sum, as the SWEET rule states.
- Parameters the backbone feeds to every block outside the hidden state (DeBERTa's relative
  position embeddings and their LayerNorm) get gradient from every exit, as in the reference
  DeBERTa code, which detaches only the hidden state.
- Blocks whose weights are shared across an exit (ALBERT groups that straddle an exit) cannot
  be separated: :meth:`SweetStrategy.build_stages` refuses them, and heads that read the
  previous exit's logits with gradient (cascade heads with ``detach_previous=False``) would
  carry a deeper loss into a shallower segment, so they are refused too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..heads import uses_previous_logits
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

# (head path, trunk path) at every exit: the head's own gradient passes, deeper exits' stop.
SWEET_SCALES = (1.0, 0.0)


def sweet_grad_scales(num_exits: int) -> list[tuple[float, float]]:
    """``grad_scales`` for :meth:`MultiExitModel.forward` that give each segment of layers the
    gradient of the next exit's loss only."""
    return [SWEET_SCALES] * int(num_exits)


def _check_segments_separate(model: MultiExitModel) -> None:
    """Refuse block weights shared by two segments (ALBERT-style groups across an exit)."""
    block_of = getattr(model.backbone, "block", None)
    if not callable(block_of):
        return  # adapters without per-block access (each block is its own module there)
    owner: dict[int, int] = {}
    start = 0
    for k, depth in enumerate(model.exit_layers):
        for i in range(start, depth):
            for p in block_of(i).parameters():
                first = owner.setdefault(id(p), k)
                if first != k:
                    raise ConfigError(
                        f"sweet gives every exit its own layers, but block {i + 1} shares its "
                        f"weights with a block below exit {first} (depth "
                        f"{model.exit_layers[first]}): this backbone shares weights across "
                        "layers (ALBERT groups). Put exits only where a group of shared layers "
                        "ends, or choose another strategy"
                    )
        start = depth


def _check_heads_separate(model: MultiExitModel) -> None:
    """Refuse heads through which a deeper loss reaches a shallower exit's logits."""
    for k, head in enumerate(model.heads):
        if k > 0 and uses_previous_logits(head) and not getattr(head, "detach_previous", False):
            raise ConfigError(
                f"sweet separates the exits' weights, but exit {k}'s head reads exit {k - 1}'s "
                "logits with gradient, so its loss would train the layers below exit "
                f"{k - 1}; use head_kwargs={{'detach_previous': True}} or a head that does not "
                "cascade"
            )


@register_strategy("sweet")
class SweetStrategy(TrainingStrategy):
    """One stage: backbone and every head on ``sum_k L_k`` with the SWEET gradient cut."""

    tunes_backbone = True
    tasks = ("classification", "regression")

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        _check_segments_separate(model)
        _check_heads_separate(model)
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=weighted_exit_loss([1.0] * model.num_exits),  # the reference's plain sum
                forward_kwargs={"grad_scales": sweet_grad_scales(model.num_exits)},
            )
        ]

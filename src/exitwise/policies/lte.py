"""``lte``: BERxiT's learning-to-exit rule (Xin et al., EACL 2021, sec. 3.2): a row leaves at
the first exit whose learned certainty ``u_k`` (the model's ``lte`` exit scorer,
:mod:`exitwise.heads.lte`) is at least ``threshold``.

Reference: ``BertEncoder.forward`` in castorini/berxit (``transformers/modeling_highway_bert.py``)
exits when ``lte_output < lte_th[i]``, its module being trained towards *wrongness* targets
(0.01 for a right exit, 0.99 for a wrong one, mapped by ``1 - exp(-x)``); the paper's module
predicts a certainty instead. Here the score is the certainty (trained by the ``berxit``
strategy), so the rule is ``u_k >= threshold``: the same decision with the direction turned.
One threshold for all exits (the reference's per-layer list is a hand-tuned variant).

The rule reads only the score, so it works for regression (STS-B) as well as classification.
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import InputError
from .base import ExitPolicy, register_policy


@register_policy("lte")
class LTEPolicy(ExitPolicy):
    param = "threshold"
    safer_when = "higher"
    param_range = (0.0, 1.0)
    tasks = ("classification", "regression")
    uses_scores: ClassVar[bool] = True
    scorer: ClassVar[str | None] = "lte"
    scorer_strategy: ClassVar[str | None] = "berxit"

    def __init__(self, threshold: float = 0.9) -> None:
        super().__init__(threshold=threshold)

    def decide(self, exit_index, num_exits, logits, state, labels=None, scores=None):
        if scores is None:
            raise InputError("the lte policy needs the exit scores (scores=...) of a model "
                             "with BERxiT's learning-to-exit scorer")
        if scores.shape != (logits.shape[0],):
            raise InputError(f"lte: scores must be (batch,) = ({logits.shape[0]},), got "
                             f"{tuple(scores.shape)}")
        return scores >= self.value, state

    def grid(self, num_exits: int) -> list[float]:
        # Certainties live in (0, 1); finer near 1, where a cautious setting sits.
        coarse = [round(0.02 * i, 4) for i in range(0, 50)]
        fine = [round(0.99 + 0.0005 * i, 5) for i in range(21)]
        return sorted(set(coarse + [round(0.9 + 0.005 * i, 4) for i in range(19)] + fine))

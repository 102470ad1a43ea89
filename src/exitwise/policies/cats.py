"""``cats``: CATs' exit rule (Schuster et al., EMNLP 2021, sec. 4): a row leaves at the first
exit whose meta consistency score (the ``cats`` exit scorer, :mod:`exitwise.heads.cats`) is
*above* the threshold, strictly, as ``shared_early_exit`` in the authors' conformal library
(``x[l] > quantile``). Set the threshold with the conformal calibration
(:func:`exitwise.calibration.conformal.calibrate_cats`), which guarantees consistency with the
full model at ``1 - epsilon``; any other search works too, without that guarantee.
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import InputError
from .base import ExitPolicy, register_policy


@register_policy("cats")
class CATsPolicy(ExitPolicy):
    param = "threshold"
    safer_when = "higher"
    param_range = (0.0, 1.0)
    uses_scores: ClassVar[bool] = True
    scorer: ClassVar[str | None] = "cats"
    scorer_strategy: ClassVar[str | None] = "cats"

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__(threshold=threshold)

    def decide(self, exit_index, num_exits, logits, state, labels=None, scores=None):
        if scores is None or scores.shape != (logits.shape[0],):
            raise InputError("the cats policy needs (batch,) meta consistency scores "
                             "(scores=...) from a model with the cats exit scorer")
        return scores > self.value, state

    def grid(self, num_exits: int) -> list[float]:
        coarse = [round(0.05 * i, 4) for i in range(20)]
        fine = [round(0.95 + 0.0025 * i, 5) for i in range(21)]
        return sorted(set(coarse + fine))

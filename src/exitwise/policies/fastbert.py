"""``fastbert``: FastBERT's adaptive inference (Liu et al., ACL 2020, sec. 3.3): a sample leaves
at the first exit whose normalized entropy ``Uncertainty = -sum_c p_c log p_c / log C`` is
below the speed threshold.

Reference: the authors' ``fastbert`` package (autoliuweijie/FastBERT, ``FastBERT._fast_infer``):
``if uncertainty < speed: break`` on the softmax of each student classifier, in [0, 1] whatever
the number of classes C. The rule is strict (``<``) as there; ``speed = 0`` never exits early.
"""

from __future__ import annotations

from .base import ExitPolicy, register_policy
from .window import normalized_uncertainty


@register_policy("fastbert")
class FastBERTPolicy(ExitPolicy):
    param = "speed"
    safer_when = "lower"
    param_range = (0.0, 1.0)

    def __init__(self, speed: float = 0.5) -> None:
        super().__init__(speed=speed)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        return normalized_uncertainty(logits, "entropy") < self.value, state

    def grid(self, num_exits: int) -> list[float]:
        # The paper sweeps speed in [0, 1]; finer near 0, where most exits are decided.
        fine = [round(0.001 * i, 4) for i in range(0, 50)]
        return sorted(set(fine + [round(0.05 + 0.01 * i, 4) for i in range(96)]))

"""``oracle``: leave at the first exit whose prediction is correct (analysis only; needs labels).

Rows that no exit gets right run to the final exit. This is the upper bound of any policy
on these exits, used by SDN-style analyses; it cannot be deployed.
"""

from __future__ import annotations

from ..errors import InputError
from .base import ExitPolicy, register_policy


@register_policy("oracle")
class OraclePolicy(ExitPolicy):
    param = "none"
    needs_labels = True

    def __init__(self) -> None:
        super().__init__()

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        if labels is None:
            raise InputError("the oracle policy needs labels (it is for analysis only)")
        return logits.argmax(-1) == labels, state

    def grid(self, num_exits: int) -> list[float]:
        return [0.0]

    def with_param(self, value):
        return OraclePolicy()

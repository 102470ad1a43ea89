"""``calm_top2``: CALM's softmax top-2 difference - exit when p1 - p2 exceeds the
position-decayed threshold (see :mod:`.calm_base`)."""

from __future__ import annotations

from .base import register_policy
from .calm_base import CalmPolicy, top2_gap


@register_policy("calm_top2")
class CalmTop2Policy(CalmPolicy):
    def measure(self, logits, state):
        return top2_gap(logits)

"""``calm_softmax``: CALM's softmax response - exit when the top-1 probability exceeds the
position-decayed threshold (see :mod:`.calm_base`)."""

from __future__ import annotations

from .base import register_policy
from .calm_base import CalmPolicy, softmax_max


@register_policy("calm_softmax")
class CalmSoftmaxPolicy(CalmPolicy):
    def measure(self, logits, state):
        return softmax_max(logits)

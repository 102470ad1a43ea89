"""``calm_maxprob``: exit when the top-1 softmax probability exceeds CALM's position-decayed
threshold (see :mod:`.calm_base`).

This is the default confidence of the authors' t5x code (``t5x/contrib/calm/models.py``,
``EncoderDecoderModel.get_pred_confidence``, ``conf_method='softmax_max'``); the paper's
*softmax response* is the top-1 minus top-2 gap, ``calm_softmax``. For the same threshold this
measure exits at least as often (p1 >= p1 - p2).
"""

from __future__ import annotations

from .base import register_policy
from .calm_base import CalmPolicy, softmax_max


@register_policy("calm_maxprob")
class CalmMaxProbPolicy(CalmPolicy):
    """Exit when p1 > lambda_t; logits (B, V) -> decisions (B,)."""

    def measure(self, logits, state):
        return softmax_max(logits)

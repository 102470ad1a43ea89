"""``calm_softmax``: CALM's *softmax response* (Schuster et al., 2022): the confidence of an
exit is the gap between its two largest softmax probabilities, ``c = p1 - p2``, and the token
exits when ``c`` exceeds the position-decayed threshold (see :mod:`.calm_base`).

Reference: the paper's "softmax response" measure; the authors' t5x code
``t5x/contrib/calm/models.py``, ``EncoderDecoderModel.get_pred_confidence`` with
``conf_method='softmax_diff'`` (sorted probabilities, top-1 minus top-2). The code's own
default ``conf_method='softmax_max'`` (the top-1 probability alone) is ``calm_maxprob``.
``calm_top2`` is an alias of this policy (the same measure under its older name).

Deviations: see :mod:`.calm_base` (paper's threshold decay, per-row strict ``c > lambda_t``).
With a draft vocabulary the softmax runs over the exit's K token ids (the head's own
read-out), not over all V.
"""

from __future__ import annotations

from .base import register_policy
from .calm_base import CalmPolicy, top2_gap


@register_policy("calm_softmax")
class CalmSoftmaxPolicy(CalmPolicy):
    """Exit when p1 - p2 > lambda_t; logits (B, V) -> decisions (B,)."""

    def measure(self, logits, state):
        return top2_gap(logits)

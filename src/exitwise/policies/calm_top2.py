"""``calm_top2``: an alias of ``calm_softmax`` (CALM's softmax response, p1 - p2).

Before ``calm_softmax`` measured the top-2 gap, this name was the only one that did; it is kept
so that saved policy dicts and scripts using it keep their meaning. Both names decide
identically (tested); new code should use ``calm_softmax``.
"""

from __future__ import annotations

from .base import register_policy
from .calm_softmax import CalmSoftmaxPolicy


@register_policy("calm_top2")
class CalmTop2Policy(CalmSoftmaxPolicy):
    """Same measure as :class:`~.calm_softmax.CalmSoftmaxPolicy`, registered under its older
    name."""

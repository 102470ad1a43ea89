"""``calm_saturation``: CALM's hidden-state saturation - exit when the cosine similarity between
the hidden state at this exit and at the previous exit exceeds the position-decayed threshold
(see :mod:`.calm_base`). At the first exit the "previous" state is the token embedding.

The early-exit decoder supplies the hidden states (``state["hidden"]`` and
``state["prev_hidden"]``, (B, H)). Elsewhere (the classification executor, offline replay)
only logits exist: they stand in for the hidden state (cosine of this exit's logits with the
previous exit's, kept in ``state["prev_logits"]``), and no row exits at its first exit.
"""

from __future__ import annotations

import torch

from .base import register_policy
from .calm_base import CalmPolicy, cosine_saturation


@register_policy("calm_saturation")
class CalmSaturationPolicy(CalmPolicy):
    needs_hidden = True

    def measure(self, logits, state):
        if "hidden" in state and "prev_hidden" in state:
            return cosine_saturation(state["hidden"], state["prev_hidden"])
        prev = state.get("prev_logits")
        if prev is None or prev.shape != logits.shape:
            return torch.full((logits.shape[0],), -1.0, device=logits.device)
        return cosine_saturation(logits, prev)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        exits, _ = super().decide(exit_index, num_exits, logits, state, labels)
        if "hidden" in state:
            return exits, {**state, "prev_hidden": state["hidden"]}
        return exits, {**state, "prev_logits": logits.detach().float()}

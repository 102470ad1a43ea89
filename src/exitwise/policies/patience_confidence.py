"""``patience_confidence``: PCEE-BERT (Zhang et al., 2022), patient and confident early exit.

A row leaves at the first exit where ``patience`` consecutive exits (this one included) were
*confident*; any unconfident exit resets the run. Confidence is measured by the normalized
entropy of the exit's prediction, as in the paper::

    H~(p) = -sum_c p_c log p_c / log C,      confident  <=>  H~(p) < threshold

(C classes, so H~ is in [0, 1]). ``measure="maxprob"`` uses the top softmax probability
instead: confident <=> max_c p_c >= threshold.

Reference: the authors' code, michael-wzhu/PCEE-BERT ``pabee/modeling_pabee_bert.py``,
``BertModelWithPabeeV1.forward`` (``normal_shannon_entropy``; the counter is incremented when
``cur_entropy < exiting_threshold``, reset to 0 otherwise, and the model exits when it equals
the patience; it counts from the first exit). Their scripts use patience 2 and sweep the
threshold over 1/18 .. 1/2; exitwise defaults to patience 2, threshold 0.3.

The tuned parameter is the threshold; patience stays fixed.

Deviations: the reference's optional ensembling of the confident exits' probabilities
(``do_ensemble``) is not implemented (a row returns its exit's own logits). Before exitwise
followed the paper, this policy measured the top probability (now ``measure="maxprob"``).

State: ``count`` (B,) long, the current run of consecutive confident exits.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState, register_policy

MEASURES = ("entropy", "maxprob")
DEFAULT_THRESHOLD = {"entropy": 0.3, "maxprob": 0.9}


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits -> (B,) entropy of the softmax divided by log C, in [0, 1] (0 for C = 1)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    c = logits.shape[-1]
    return ent / math.log(c) if c > 1 else torch.zeros_like(ent)


@register_policy("patience_confidence")
class PatienceConfidencePolicy(ExitPolicy):
    """Exit after ``patience`` consecutive confident exits; logits (B, C) -> decisions (B,)."""

    param = "threshold"
    param_range = (0.0, 1.0)

    def __init__(
        self, threshold: float | None = None, patience: int = 2, measure: str = "entropy"
    ) -> None:
        if measure not in MEASURES:
            raise ConfigError(
                f"patience_confidence: measure must be one of {', '.join(MEASURES)}; "
                f"got {measure!r}"
            )
        if threshold is None:  # the two measures point in opposite directions
            threshold = DEFAULT_THRESHOLD[measure]
        super().__init__(threshold=threshold, patience=patience, measure=measure)
        # A lower entropy bound / a higher probability bound counts fewer exits as confident.
        self.safer_when = "lower" if measure == "entropy" else "higher"
        self._check_range("patience", patience, (1, 10_000))
        if int(patience) != patience:
            raise ConfigError(f"patience_confidence: patience must be an integer, got {patience}")

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        return {"count": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def confident(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) logits -> (B,) bool: the exit counts towards the patience."""
        if self.params["measure"] == "entropy":
            return normalized_entropy(logits) < float(self.value)
        return torch.softmax(logits.float(), dim=-1).amax(-1) >= float(self.value)

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        confident = self.confident(logits)
        count = torch.where(confident, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= int(self.params["patience"]), {"count": count}

    def grid(self, num_exits: int) -> list[float]:
        if self.params["measure"] == "entropy":
            # Normalized entropy: 0 never counts as confident (strict <), 1 almost always; a
            # geometric grid resolves the small values confident exits have.
            return [0.0] + [round(10 ** (-4 + 4 * i / 99), 6) for i in range(100)]
        return [round(0.5 + 0.005 * i, 4) for i in range(100)] + [0.9975, 0.999, 1.0]

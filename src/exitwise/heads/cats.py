"""``cats``: the meta consistency classifier of CATs (Schuster et al., EMNLP 2021, "Consistent
Accelerated Inference via Confident Adaptive Transformers", sec. 4.1).

At every exit k a small classifier estimates the probability that exit k's prediction equals
the full model's: ``g_k = sigmoid(MLP_k([h_k; p_max; H(p)]))`` with ``h_k`` the exit head's
feature (the input of its classifier layer), ``p_max`` the top class probability of exit k
and ``H(p)`` the entropy of its distribution (both of the raw logits), so the meta classifier
sees the representation and how sure the exit itself is. One MLP per exit (the exits differ
in depth and width), hidden width ``hidden`` (64), ReLU.

The score is trained by the ``cats`` strategy (:mod:`exitwise.training.cats`) and thresholded
by the ``cats`` policy, whose threshold the conformal calibration of
:mod:`exitwise.calibration.conformal` sets.

Reference: the authors' public code was not found (only their conformal library, whose
``shared_early_exit`` the calibration follows); the classifier's inputs and size here are this
library's choice, stated as a deviation: the paper's meta features are the exit's
representation and confidence features of its prediction; the MLP width and the two summary
features are not from the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .scorer import ExitScorer, register_scorer


def confidence_features(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2): the top class probability and the entropy of ``softmax(logits)`` (B, C)."""
    logp = torch.log_softmax(logits.float(), -1)
    p = logp.exp()
    return torch.stack([p.max(-1).values, -(p * logp).sum(-1)], dim=-1)


@register_scorer("cats")
class CATsScorer(ExitScorer):
    def __init__(self, feature_dims: list[int], num_labels: int, hidden: int = 64) -> None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"cats scorer: hidden must be an int >= 1; got {hidden!r}")
        super().__init__(feature_dims, num_labels, hidden=int(hidden))
        self.hidden = int(hidden)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d + 2, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
            for d in self.feature_dims
        )

    def logit(self, k: int, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B,) the pre-sigmoid score (what the BCE loss reads, for numerical safety)."""
        x = torch.cat([feature.float(), confidence_features(logits)], dim=-1)
        dtype = next(self.mlps[k].parameters()).dtype  # a half-precision model's own
        return self.mlps[k](x.to(dtype)).float().squeeze(-1)

    def forward(self, k: int, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(k, feature, logits))

    def scorer_flops(self, k: int, batch_size: int) -> torch.Tensor:
        d = self.feature_dims[k] + 2
        per_row = 2.0 * (d * self.hidden + self.hidden) + 6.0 * self.num_labels
        return torch.full((batch_size,), per_row, dtype=torch.float64)

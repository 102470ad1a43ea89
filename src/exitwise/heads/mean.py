"""``mean``: mean over the real (unpadded) tokens, then a linear layer."""

from __future__ import annotations

import torch
from torch import nn

from .base import ExitHead, register_head


@register_head("mean")
class MeanPoolHead(ExitHead):
    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__(in_features, num_labels, dropout)
        self.classifier = nn.Linear(in_features, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.token_mean(hidden, mask)  # feature maps: pooled over space
        return self.classifier(self.dropout(pooled))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        n = (
            mask.sum(1).to(torch.float64)
            if mask is not None
            else torch.ones(batch_size, dtype=torch.float64)
        )
        return n * self.in_features + self.linear_flops(self.classifier)

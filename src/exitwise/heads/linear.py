"""``linear``: one linear layer on the first ([CLS]) token (or on flat features)."""

from __future__ import annotations

import torch
from torch import nn

from .base import ExitHead, register_head


@register_head("linear")
class LinearHead(ExitHead):
    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__(in_features, num_labels, dropout)
        self.classifier = nn.Linear(in_features, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.first_token(hidden)))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), self.linear_flops(self.classifier), dtype=torch.float64)

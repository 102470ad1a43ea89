"""``mlp``: a two-layer perceptron (dense + GELU + linear) on the first token."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import ExitHead, register_head


@register_head("mlp")
class MLPHead(ExitHead):
    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        hidden_features: int | None = None,
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        if hidden_features is not None and (
                isinstance(hidden_features, bool) or not isinstance(hidden_features, int)
                or hidden_features < 1):  # 0 once meant the input width
            raise ConfigError(f"mlp head: hidden_features must be an int >= 1 or None (the "
                              f"input width); got {hidden_features!r}")
        width = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.act(self.fc1(self.dropout(self.first_token(hidden))))
        return self.fc2(self.dropout(x))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        flops = self.linear_flops(self.fc1, self.fc2)
        return torch.full((batch_size,), flops, dtype=torch.float64)

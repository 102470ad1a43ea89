"""``pooler``: DeeBERT's highway exit, BERT's pooler (dense + tanh on [CLS]) then a linear layer.

With ``init_from_pooler=True`` (default) the dense layer starts as a copy of the backbone's
own pretrained pooler when it has one, which makes early exits train faster than from noise.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ExitHead, register_head


@register_head("pooler")
class PoolerHead(ExitHead):
    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        init_from_pooler: bool = True,
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        self.init_from_pooler = init_from_pooler
        self.dense = nn.Linear(in_features, in_features)
        self.classifier = nn.Linear(in_features, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = torch.tanh(self.dense(self.first_token(hidden)))
        return self.classifier(self.dropout(pooled))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        flops = self.linear_flops(self.dense, self.classifier)
        return torch.full((batch_size,), flops, dtype=torch.float64)

    def init_from_backbone(self, backbone: nn.Module) -> None:
        getter = getattr(backbone, "pooler_module", None)
        source = getter() if (self.init_from_pooler and getter is not None) else None
        if isinstance(source, nn.Linear) and source.weight.shape == self.dense.weight.shape:
            with torch.no_grad():
                self.dense.weight.copy_(source.weight)
                self.dense.bias.copy_(source.bias)

"""``fastbert``: FastBERT's student classifier (Liu et al., ACL 2020, sec. 3.1, Fig. 2).

Reference: ``BertMiniClassifier`` in the authors' ``fastbert`` package (autoliuweijie/FastBERT):
the token states go through a linear layer to a small width (128) and tanh, one multi-head
self-attention over the real tokens (2 heads), then the first token ([CLS]) through a linear
layer + tanh and the output layer. Being a classifier over *all* tokens, it is stronger than
a [CLS]-only head at the same depth.

Deviations: the attention is ``nn.MultiheadAttention`` (learned Q/K/V and output projections;
the reference's UER attention has the same four projections) and only the first token is
computed as a query, since only it is read (the reference's default pooling, the first token);
padded tokens are excluded as keys by the attention mask; the ``dropout`` every exitwise head
takes is applied before the output layer (the reference drops out inside the attention
only). Flat features (B, H) act as one token and feature maps are pooled
over space to one token, so the head works after any backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import ExitHead, register_head


@register_head("fastbert")
class FastBERTHead(ExitHead):
    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.1,
                 width: int = 128, num_heads: int = 2) -> None:
        super().__init__(in_features, num_labels, dropout)
        for name, value in (("width", width), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"fastbert head: {name} must be an int >= 1; got {value!r}")
        if width % num_heads:
            raise ConfigError(f"fastbert head: width {width} must be a multiple of num_heads "
                              f"{num_heads} (each attention head takes width / num_heads)")
        self.width = width
        self.proj = nn.Linear(in_features, width)
        self.attention = nn.MultiheadAttention(width, num_heads, dropout=dropout,
                                               batch_first=True)
        self.dense = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.dim() != 3:
            hidden, mask = self.spatial_mean(hidden).unsqueeze(1), None
        x = torch.tanh(self.proj(hidden))
        pad = None if mask is None else ~mask.bool()
        # Only the first token's output is read: it alone is the query.
        attended, _ = self.attention(x[:, :1], x, x, key_padding_mask=pad, need_weights=False)
        pooled = torch.tanh(self.dense(attended[:, 0]))
        return self.classifier(self.dropout(pooled))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Per row with n tokens: the projection of n tokens, keys and values of n tokens,
        one query, scores and weighted sum over n keys, the output projection, dense and
        classifier (multiply-adds x2)."""
        n = (mask.sum(1).to(torch.float64) if mask is not None
             else torch.ones(batch_size, dtype=torch.float64))
        w = float(self.width)
        per_token = 2 * self.in_features * w + 2 * 2 * w * w + 2 * 2 * w  # proj, K/V, score+sum
        fixed = 2 * w * w * 2 + self.linear_flops(self.dense, self.classifier)  # Q, out, dense
        return n * per_token + fixed

"""``smartbert``: SmartBERT's exit classifier (a head) and skipping gate (a skip gate).

Hu et al., IJCAI 2023, "SmartBERT: A Promotion of Dynamic Early Exiting Mechanism for
Accelerating BERT Inference", sec. 3.1 (Fig. 2). Reference: HuBoren99/SmartBert,
``models/Classifier.py`` (``Classifier``), ``models/Gate.py`` (``Gate``)
and ``models/MultiheadAttention.py``.

- The exit head (``Classifier``): token states -> linear to a small width (128) + tanh ->
  multi-head self-attention (4 heads) -> the first token ([CLS]) -> linear + tanh -> the output
  layer. :meth:`SmartBERTHead.token_states` exposes the tanh'd token states that the second
  training stage's cross-layer contrastive loss reads (through the reference's ``main``
  projection, which is training-only and lives with the strategy,
  :mod:`exitwise.training.smartbert`, so that a head's parameters are exactly those of its
  classification path).
- The skipping gate (``Gate``), one per block, on the block's *input*: linear to 128 + tanh ->
  self-attention (2 heads) -> [CLS] -> linear to one logit -> sigmoid: the probability that the
  row skips the block. At inference a row skips when it is >= the threshold (the reference's
  ``skipped_rate``, 0.5).
- The attention of both is the reference's: query, key and value projections, scaled dot
  products over the real tokens, dropout on the attention probabilities, *no* output
  projection. Only the first token is computed as a query, since only it is read.

Deviations: padded keys are excluded by a -inf mask (the reference adds -10000); the head's
``dropout`` (every exitwise head takes one) is the attention dropout, as the reference's
classifier uses BERT's attention dropout; flat features (B, H) act as one token and feature
maps are pooled over space to one token, so head and gate work after any backbone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .base import ExitHead, register_head
from .skip_gate import SkipGate, register_gate


def as_tokens(hidden: torch.Tensor, mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, H) passes through; flat (B, H) and feature maps (B, C, *spatial) become one token
    (B, 1, H) (maps averaged over space), with no mask."""
    if hidden.dim() == 3:
        return hidden, mask
    return ExitHead.spatial_mean(hidden).unsqueeze(1), None


class FirstTokenAttention(nn.Module):
    """Multi-head attention read at the first token: (B, T, W) tokens -> (B, W).

    Query (of the first token only), key and value projections; scores scaled by
    1/sqrt(W / heads); padded keys (``mask`` (B, T) == 0) get no weight; dropout on the
    probabilities; the heads' outputs are concatenated without an output projection.
    """

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if width % num_heads:
            raise ConfigError(f"width {width} is not a multiple of num_heads {num_heads}")
        self.width, self.num_heads = int(width), int(num_heads)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.num_heads, self.width // self.num_heads
        q = self.query(x[:, :1]).view(b, 1, h, d).transpose(1, 2)  # (B, h, 1, d)
        k = self.key(x).view(b, t, h, d).transpose(1, 2)  # (B, h, T, d)
        v = self.value(x).view(b, t, h, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, 1, T)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        probs = self.dropout(scores.softmax(-1))
        return (probs @ v).transpose(1, 2).reshape(b, self.width)

    def flops(self, n: torch.Tensor) -> torch.Tensor:
        """(B,) FLOPs for rows of ``n`` (B,) real tokens: keys and values of n tokens, one
        query, scores and weighted sum over n keys (multiply-adds x2)."""
        w = float(self.width)
        return n * (2 * 2 * w * w + 2 * 2 * w) + 2 * w * w


def _tokens(mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    return (mask.sum(1).to(torch.float64).cpu() if mask is not None
            else torch.ones(batch_size, dtype=torch.float64))


@register_head("smartbert")
class SmartBERTHead(ExitHead):
    """SmartBERT's exit classifier (reference defaults: width 128, 4 attention heads)."""

    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.1,
                 width: int = 128, num_heads: int = 4) -> None:
        super().__init__(in_features, num_labels, dropout)
        self.width = int(width)
        self.proj = nn.Linear(in_features, width)
        self.attention = FirstTokenAttention(width, num_heads, dropout)
        self.dense = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_labels)

    def token_states(self, hidden: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, width) ``tanh(proj(hidden))`` and the mask: what the attention reads and what
        the cross-layer contrastive loss of training stage 2 projects."""
        hidden, mask = as_tokens(hidden, mask)
        return torch.tanh(self.proj(hidden)), mask

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = self.token_states(hidden, mask)
        pooled = torch.tanh(self.dense(self.attention(x, mask)))
        return self.classifier(pooled)

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        n = _tokens(mask, batch_size)
        return (n * 2 * self.in_features * self.width + self.attention.flops(n)
                + self.linear_flops(self.dense, self.classifier))


@register_gate("smartbert")
class SmartBERTGate(SkipGate):
    """SmartBERT's skipping gates, one per block.

    input_dims: width of each block's input. width / num_heads / dropout: the gate network
    (reference: 128, 2, BERT's attention dropout).
    """

    def __init__(self, input_dims: list[int], threshold: float = 0.5, width: int = 128,
                 num_heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__(input_dims, threshold, width=int(width), num_heads=int(num_heads),
                         dropout=float(dropout))
        self.width = int(width)
        self.proj = nn.ModuleList(nn.Linear(d, width) for d in self.input_dims)
        self.attention = nn.ModuleList(FirstTokenAttention(width, num_heads, dropout)
                                       for _ in self.input_dims)
        self.out = nn.ModuleList(nn.Linear(width, 1) for _ in self.input_dims)

    def forward(self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden, mask = as_tokens(hidden, mask)
        x = torch.tanh(self.proj[i](hidden))
        return torch.sigmoid(self.out[i](self.attention[i](x, mask))).squeeze(-1)

    def gate_flops(self, i: int, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        n = _tokens(mask, batch_size)
        return (n * 2 * self.input_dims[i] * self.width + self.attention[i].flops(n)
                + 2.0 * self.width)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())

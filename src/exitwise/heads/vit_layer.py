"""``vit_layer``: SL-ViT's exit, one transformer encoder layer then a linear classifier
(Bakhtiarnia, Zhang & Iosifidis, "Single-Layer Vision Transformers for More Accurate Early
Exits with Less Overhead", 2022).

The layer (pre-norm: attention over the token sequence, then an MLP, each with a residual)
lets the exit mix information across all tokens before it classifies, where a linear exit only
sees the CLS token. Then a LayerNorm, the CLS token (``pool="token"``) or the mean of the real
tokens (``pool="mean"``), and a linear layer.

Inputs: tokens (B, T, H) with ``mask`` (B, T) (padding is never attended to); feature maps
(B, C, H, W) become H*W tokens of width C (always mean-pooled: there is no CLS position);
flat features (B, H) are one token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import ExitHead, register_head


def default_num_heads(width: int) -> int:
    """Heads of about 64 channels each (ViT's choice), at least 1, dividing ``width``."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


@register_head("vit_layer")
class ViTLayerHead(ExitHead):
    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        num_heads: int | None = None,
        mlp_ratio: float = 2.0,
        pool: str = "token",
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        heads = default_num_heads(in_features) if num_heads is None else num_heads
        if not isinstance(heads, int) or heads < 1 or in_features % heads:
            raise ConfigError(f"num_heads must divide the width {in_features}; got {num_heads!r}")
        if pool not in ("token", "mean"):
            raise ConfigError(f"pool must be 'token' (CLS) or 'mean'; got {pool!r}")
        if mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        width = in_features
        self.num_heads, self.pool = heads, pool
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, int(width * mlp_ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(width * mlp_ratio), width)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_labels)

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Multi-head self-attention (B, T, H) -> (B, T, H); keys where mask == 0 are ignored."""
        b, t, h = x.shape
        d = h // self.num_heads
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * d**-0.5  # (B, heads, T, T)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        out = scores.softmax(-1) @ v  # (B, heads, T, H / heads)
        return self.proj(out.transpose(1, 2).reshape(b, t, h))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pool = self.pool
        if hidden.dim() == 4:  # (B, C, H, W) -> (B, H*W, C)
            hidden, mask, pool = hidden.flatten(2).transpose(1, 2), None, "mean"
        elif hidden.dim() == 2:
            hidden, mask = hidden.unsqueeze(1), None
        x = hidden + self.attend(self.norm1(hidden), mask)
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        x = self.norm(x)
        if pool == "token":
            pooled = x[:, 0]
        elif mask is None:
            pooled = x.mean(1)
        else:
            m = mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Per row, for its n real tokens. On a feature map the runtime passes a mask over its
        H x W cells (``runtime.flops.head_mask``); without any mask, one token."""
        n = (
            mask.sum(1).to(torch.float64)
            if mask is not None
            else torch.ones(batch_size, dtype=torch.float64)
        )
        per_token = self.linear_flops(self.qkv, self.proj, self.fc1, self.fc2)
        attention = 2.0 * 2.0 * self.in_features  # scores and weighted sum, per token pair
        return n * per_token + n * n * attention + self.linear_flops(self.classifier)

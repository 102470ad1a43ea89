"""LGViT's heterogeneous exit heads (Xu et al., "LGViT: Dynamic Early Exiting for Accelerating
Vision Transformer", ACM MM 2023).

LGViT finds that shallow ViT exits lack local detail and deep exits lack an overall view, so it
puts two kinds of head on a ViT: ``lgvit_local`` (local perception) on the shallow exits and
``lgvit_global`` (global aggregation) on the deep ones.

- ``lgvit_local``: the patch tokens are laid back onto their 2-D patch grid and go through a
  point-wise expansion, a 3x3 depth-wise convolution (each patch mixes with its neighbours)
  and a point-wise projection, with a residual; then LayerNorm, mean over patches, linear.
- ``lgvit_global``: neighbouring patches are first aggregated (mean over ``reduction`` x
  ``reduction`` windows of the grid, cutting the tokens by ``reduction**2``), the prefix
  ([CLS]) tokens join them, one multi-head self-attention layer (pre-norm, residual) lets
  every token see all the others, then LayerNorm, mean over tokens, linear.

Reference: ``falcon-xu/LGViT`` ``models/deit_highway/highway.py`` (``highway_conv1_1`` /
``highway_conv2_1`` local heads, ``GlobalSparseAttn`` global heads). Deviations from those
heads: the local head normalises with LayerNorm instead of BatchNorm and its depth-wise
convolution has no BatchNorm; the global head aggregates ``reduction`` x ``reduction`` windows
by their mean (the reference keeps every ``reduction``-th token, ``AvgPool2d(1, r)``), keeps the
prefix tokens in the attention and adds a residual and a LayerNorm, and both heads pool by the
mean of the tokens (the reference adds the CLS embedding to the pooled patches).
:meth:`LGViTLocalHead.distill_tokens` / :meth:`LGViTGlobalHead.distill_tokens` expose the
per-token features LGViT's self-distillation compares (``exitwise.training.lgvit``).

Which tokens form a grid: feature maps (B, C, H, W) are the grid. Tokens (B, T, H) without a
mask, or from a ViT (the head learns that from the backbone at attach time; the vision adapter
gives ViT tokens an all-ones mask), form an n x n grid when T - 1 (one prefix token, ViT's
[CLS]) or T is a square; other token sequences, and text with a mask (padded batches), are a
1 x T line, so the convolution and the window mean run along the sequence over real tokens
only. Flat features (B, H) are a single patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import ExitHead, register_head
from .vit_layer import default_num_heads


def token_grid(
    hidden: torch.Tensor, mask: torch.Tensor | None, patches: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grid (B, H, h, w), real (B, 1, h, w) float, prefix tokens (B, P, H) or None).

    Tokens (B, T, H) are a square patch grid after 0 or 1 prefix tokens when there is no
    mask, or when ``patches`` says they come from a ViT (whose mask is all ones: every image
    has every patch); otherwise, text-like, a line of T cells with the mask's padding."""
    if hidden.dim() == 4:
        b, _, h, w = hidden.shape
        return hidden, hidden.new_ones(b, 1, h, w), None
    if hidden.dim() == 2:
        return hidden[:, :, None, None], hidden.new_ones(hidden.shape[0], 1, 1, 1), None
    if hidden.dim() != 3:
        raise ConfigError(
            f"LGViT heads read (B, T, H), (B, C, H, W) or (B, H); got {tuple(hidden.shape)}"
        )
    b, t, width = hidden.shape
    if mask is None or patches:
        for prefix in (1, 0):
            side = math.isqrt(t - prefix) if t > prefix else 0
            if side > 0 and side * side == t - prefix:
                patches = hidden[:, prefix:].transpose(1, 2).reshape(b, width, side, side)
                pre = hidden[:, :prefix] if prefix else None
                return patches, hidden.new_ones(b, 1, side, side), pre
        real = hidden.new_ones(b, 1, 1, t) if mask is None else mask.to(hidden.dtype)[
            :, None, None, :]
    else:
        real = mask.to(hidden.dtype)[:, None, None, :]
    return hidden.transpose(1, 2).unsqueeze(2) * real, real, None


def masked_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(B, H, h, w) averaged over the real cells (B, 1, h, w) -> (B, H)."""
    return (x * real).flatten(2).sum(-1) / real.flatten(2).sum(-1).clamp_min(1.0)


def is_patch_backbone(backbone: nn.Module) -> bool:
    """True for a vision backbone whose features are ViT tokens (a patch grid, all real)."""
    layout = getattr(backbone, "layout", None)
    return getattr(backbone, "family", None) == "vision" and bool(getattr(layout, "tokens", 0))


class _GridHead(ExitHead):
    """An LGViT head: it reads tokens as the 2-D patch grid they come from (see
    :func:`token_grid`); whether they are ViT patches is learnt from the backbone."""

    def __init__(self, in_features: int, num_labels: int, dropout: float) -> None:
        super().__init__(in_features, num_labels, dropout)
        self.patch_tokens = False
        self.reads_maps = False  # image features: a mask over their cells is still a grid

    def init_from_backbone(self, backbone: nn.Module) -> None:
        self.patch_tokens = is_patch_backbone(backbone)
        self.reads_maps = getattr(backbone, "family", None) in ("vision", "sequential")


@register_head("lgvit_local")
class LGViTLocalHead(_GridHead):
    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        expansion: float = 2.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        if expansion <= 0:
            raise ConfigError(f"expansion must be > 0, got {expansion}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        width = max(1, int(round(in_features * expansion)))
        self.kernel_size = kernel_size
        self.norm_in = nn.LayerNorm(in_features)
        self.expand = nn.Conv2d(in_features, width, 1)
        self.depthwise = nn.Conv2d(
            width, width, kernel_size, padding=kernel_size // 2, groups=width
        )
        self.project = nn.Conv2d(width, in_features, 1)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(in_features)
        self.classifier = nn.Linear(in_features, num_labels)

    def _mixed(self, hidden: torch.Tensor, mask: torch.Tensor | None):
        """(the locally mixed grid (B, H, h, w) before the final norm, real (B, 1, h, w))."""
        grid, real, _ = token_grid(hidden, mask, self.patch_tokens)
        x = self.norm_in(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * real
        # Padding cells are zeroed before every convolution, so a padded row sees exactly the
        # zeros it would see at its own border when run alone.
        y = self.act(self.expand(x)) * real
        y = self.act(self.depthwise(y)) * real
        return grid + self.project(y), real

    def _classify(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.classifier(self.dropout(masked_mean(x, real)))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._classify(*self._mixed(hidden, mask))

    def distill_tokens(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, C), the mixed patch tokens (B, N, H) the reference's self-distillation
        reads, real (B, N) bool)."""
        x, real = self._mixed(hidden, mask)
        return self._classify(x, real), x.flatten(2).transpose(1, 2), real.flatten(1) > 0

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Per row, for its n real cells (a feature map's come as a mask over its H x W cells,
        ``runtime.flops.head_mask``; without any mask, one cell)."""
        n = (
            mask.sum(1).to(torch.float64)
            if mask is not None
            else torch.ones(batch_size, dtype=torch.float64)
        )
        width = self.expand.out_channels
        per_cell = 2.0 * self.in_features * width * 2 + 2.0 * width * self.kernel_size**2
        return n * per_cell + self.linear_flops(self.classifier)


@register_head("lgvit_global")
class LGViTGlobalHead(_GridHead):
    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        reduction: int = 2,
        num_heads: int | None = None,
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        heads = default_num_heads(in_features) if num_heads is None else num_heads
        if not isinstance(heads, int) or heads < 1 or in_features % heads:
            raise ConfigError(f"num_heads must divide the width {in_features}; got {num_heads!r}")
        if not isinstance(reduction, int) or reduction < 1:
            raise ConfigError(f"reduction must be a positive int, got {reduction!r}")
        self.num_heads, self.reduction = heads, reduction
        self.norm1 = nn.LayerNorm(in_features)
        self.qkv = nn.Linear(in_features, 3 * in_features)
        self.proj = nn.Linear(in_features, in_features)
        self.norm = nn.LayerNorm(in_features)
        self.classifier = nn.Linear(in_features, num_labels)

    def aggregate(
        self, grid: torch.Tensor, real: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Window means over real cells: (B, H, h, w) -> tokens (B, N, H), real (B, N) bool."""
        r = self.reduction
        kernel = (min(r, grid.shape[2]), min(r, grid.shape[3]))
        total = F.avg_pool2d(grid * real, kernel, kernel, ceil_mode=True)
        count = F.avg_pool2d(real, kernel, kernel, ceil_mode=True)
        tokens = total / count.clamp_min(1e-12)
        return tokens.flatten(2).transpose(1, 2), count.flatten(1) > 0

    def _attended(self, hidden: torch.Tensor, mask: torch.Tensor | None):
        """(tokens after attention (B, P + N, H) before the final norm, keep (B, P + N) bool,
        P = number of prefix tokens)."""
        grid, real, prefix = token_grid(hidden, mask, self.patch_tokens)
        x, keep = self.aggregate(grid, real)
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix.shape[1]
            x = torch.cat([prefix, x], 1)
            keep = torch.cat([keep.new_ones(prefix.shape[:2]), keep], 1)
        x = x.masked_fill(~keep.unsqueeze(-1), 0.0)
        b, t, h = x.shape
        d = h // self.num_heads
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, d).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1) * d**-0.5).masked_fill(
            ~keep[:, None, None, :], float("-inf")
        )
        x = x + self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h))
        return x, keep, num_prefix

    def _classify(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        m = keep.to(x.dtype).unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, keep, _ = self._attended(hidden, mask)
        return self._classify(x, keep)

    def distill_tokens(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, C), the attended aggregated patch tokens (B, N, H) without the prefix
        tokens, the ones LGViT's self-distillation reads; real (B, N) bool)."""
        x, keep, p = self._attended(hidden, mask)
        return self._classify(x, keep), x[:, p:], keep[:, p:]

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Per row: n real tokens aggregate into about n / reduction**2 (on a line: n /
        reduction) tokens that attend to each other (a feature map's cells come as a mask,
        ``runtime.flops.head_mask``; without any mask, one cell)."""
        n = (
            mask.sum(1).to(torch.float64)
            if mask is not None
            else torch.ones(batch_size, dtype=torch.float64)
        )
        # windows of r x r cells, else of r on a line (text)
        grid = mask is None or self.patch_tokens or self.reads_maps
        m = torch.ceil(n / (self.reduction**2 if grid else self.reduction))
        per_token = self.linear_flops(self.qkv, self.proj)
        return m * per_token + m * m * 4.0 * self.in_features + self.linear_flops(self.classifier)

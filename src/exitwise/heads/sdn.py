"""``sdn``: the internal classifier of Shallow-Deep Networks (Kaya et al., ICML 2019).

A feature map (B, C, H, W) is reduced to (B, C, s, s) by a learned mix of max and average
pooling, ``a * max + (1 - a) * avg``, then flattened into one linear layer. SDN keeps the
spatial layout (s = 4 by default) because a shallow CNN feature map pooled to a single vector
loses most of what makes it separable.

As in SDN's code (``InternalClassifier`` in the authors' ``architectures/SDNs``, kept in
``gmum/Zero-Time-Waste``): the mixing weight ``a`` (``mix``) is one free parameter, initialised
uniformly in [0, 1) (``torch.rand(1)``) and left unconstrained during training, and the head
has no dropout (the ``dropout`` option every head takes is accepted and not applied).

Deviations: SDN pools with a fixed kernel (input size / 4) and skips pooling on maps smaller
than 4x4; here adaptive pooling gives an s x s map from any size. Other inputs, so the head
works after any backbone (exported to ONNX too, from the same windows computed one by one:
:func:`_window_pools`): token sequences (B, T, H) are max- and mean-pooled over their real
tokens (``mask``), flat features (B, H) are used as they are; the pooled (B, C) vector then
fills all s*s positions, so one linear layer serves every input kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import ExitHead, register_head


def _exporting() -> bool:
    """True while torch.export (the ONNX exporter's tracer) or the legacy exporter runs."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


def _window_pools(hidden: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive max and average pooling of (B, C, H, W) to (B, C, s, s) from the windows
    PyTorch's adaptive pooling uses (rows floor(i H / s) .. ceil((i + 1) H / s), the same for
    columns), one slice per output cell: the exporter has no ONNX function for adaptive max
    pooling when H or W is not a multiple of s (a 14 x 14 map of a 224-pixel image). The
    spatial size is fixed in an exported graph (only the batch is dynamic), so the windows
    are plain integers there."""
    h, w = int(hidden.shape[-2]), int(hidden.shape[-1])
    rows = [(i * h // s, -(-(i + 1) * h // s)) for i in range(s)]
    cols = [(j * w // s, -(-(j + 1) * w // s)) for j in range(s)]
    peaks, means = [], []
    for r0, r1 in rows:
        for c0, c1 in cols:
            cell = hidden[:, :, r0:r1, c0:c1]
            peaks.append(cell.amax((-2, -1)))
            means.append(cell.mean((-2, -1)))
    shape = (hidden.shape[0], hidden.shape[1], s, s)
    return (torch.stack(peaks, -1).reshape(shape), torch.stack(means, -1).reshape(shape))


@register_head("sdn")
class SDNHead(ExitHead):
    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        pool_size: int = 4,
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"pool_size must be a positive int, got {pool_size!r}")
        self.pool_size = pool_size
        # SDN's ``alpha``: free, uniform in [0, 1) at the start, unconstrained afterwards.
        self.mix = nn.Parameter(torch.rand(1))
        self.classifier = nn.Linear(in_features * pool_size * pool_size, num_labels)
        self.dropout = nn.Identity()  # SDN's internal classifiers have no dropout

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C * s * s): the mixed max/avg pooled features the linear layer reads."""
        s = self.pool_size
        if hidden.dim() == 4:
            if _exporting():
                peak, mean = _window_pools(hidden, s)
            else:
                peak = F.adaptive_max_pool2d(hidden, s)
                mean = F.adaptive_avg_pool2d(hidden, s)
        elif hidden.dim() == 3:
            if mask is None:
                peak, mean = hidden.amax(1), hidden.mean(1)
            else:
                real = mask.bool().unsqueeze(-1)
                peak = hidden.masked_fill(~real, float("-inf")).amax(1)
                m = real.to(hidden.dtype)
                mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        elif hidden.dim() == 2:
            peak = mean = hidden
        else:
            raise ConfigError(
                f"the sdn head reads (B, C, H, W), (B, T, H) or (B, H); got {tuple(hidden.shape)}"
            )
        mixed = self.mix * peak + (1 - self.mix) * mean
        if mixed.dim() == 2:  # a vector per row: the same value at every pooled position
            mixed = mixed.unsqueeze(-1).expand(-1, -1, s * s)
        return mixed.flatten(1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooled(hidden, mask)))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        # Pooling is comparisons and additions; like torch's FLOP counter, count the linear layer.
        return torch.full((batch_size,), self.linear_flops(self.classifier), dtype=torch.float64)

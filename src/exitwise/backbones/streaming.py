"""The streaming few-row product: ``F.linear`` computed so that the weight is read once (see
:mod:`exitwise.backbones.kernels` for why and where it is used)."""

from __future__ import annotations

import torch


def streaming_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x^T)^T``, an odd row count padded
    with a zero row. x: (..., in) with few rows; weight: (out, in); returns (..., out)."""
    rows = x.numel() // max(x.shape[-1], 1)
    flat = x.reshape(rows, x.shape[-1])
    if rows % 2:
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
    # (out, rows) -> (rows, out), made contiguous (rows x out floats, a trivial copy): a
    # transposed view would make every later op of the block run on strided memory.
    out = torch.mm(weight, flat.t())[:, :rows].t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])

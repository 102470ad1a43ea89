"""Forward FLOPs of a call, counted per aten operation with PyTorch's own FLOP formulas.

``torch.utils.flop_counter.FlopCounterMode`` holds the formulas (its ``flop_registry``); it is
not used directly for two reasons, both met on models a vision user brings:

- it tracks modules to attribute counts to them, and its tracker fails under ``no_grad``
  when a module is fed a view of a parameter (timm's attention pooling, ``global_pool="map"``:
  "Expected gradient function to be set"); exitwise only needs the total;
- it has no formula for the CPU kernel of ``scaled_dot_product_attention``
  (``aten._scaled_dot_product_flash_attention_for_cpu``), so a ViT's attention products
  counted zero on a CPU while the same model with ``fused_attn=False`` counted them.

:class:`FlopCount` is a dispatch mode that adds up the registered formulas, plus one for that
kernel (the same count as torch's ``sdpa_flop_count``: 2 FLOPs per multiply-add of the
scores and of the weighted sum).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """(B, Hq, Sq, D) queries on (B, Hkv, Sk, D) keys and (B, Hkv, Sk, Dv) values."""
    b, heads, s_q, d = query
    s_k, d_v = key[-2], value[-1]
    return int(2 * b * heads * s_q * s_k * d + 2 * b * heads * s_q * s_k * d_v)


def _formulas() -> dict[Any, Callable[..., int]]:
    table = dict(flop_counter.flop_registry)
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in table:
        table[cpu_sdpa] = flop_counter.shape_wrapper(_sdpa_flops)
    return table


FORMULAS = _formulas()


class FlopCount(TorchDispatchMode):
    """``with FlopCount() as c: fn(x)`` -> ``c.total``: FLOPs of every operation run inside
    (matrix products, convolutions, attention; element-wise work is not counted, as in
    torch's counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        # Composite operations are counted by their parts, as torch's counter does (under
        # inference mode a convolution arrives as aten.conv2d, not aten.convolution).
        if func._overloadpacket not in FORMULAS and func is not torch.ops.prim.device.default:
            with self:
                parts = func.decompose(*args, **kwargs)
            if parts is not NotImplemented:
                return parts
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out

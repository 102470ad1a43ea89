"""Forward FLOPs of a call, counted per aten operation with PyTorch's own FLOP formulas.

``torch.utils.flop_counter.FlopCounterMode`` holds the formulas (its ``flop_registry``); it is
not used directly for two reasons, both met on models a vision user brings:

- it tracks modules to attribute counts to them, and its tracker fails under ``no_grad``
  when a module is fed a view of a parameter (timm's attention pooling, ``global_pool="map"``:
  "Expected gradient function to be set"); exitwise only needs the total;
- it has no formula for the CPU kernel of ``scaled_dot_product_attention``
  (``aten._scaled_dot_product_flash_attention_for_cpu``), so a ViT's attention products
  counted zero on a CPU while the same model with ``fused_attn=False`` counted them; nor for
  the fused fast paths of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` in
  eval mode without gradients, where a whole layer counted zero.

:class:`FlopCount` is a dispatch mode that adds up the registered formulas, plus one for each
of those kernels (2 FLOPs per multiply-add, as torch counts: the same as its
``sdpa_flop_count`` for attention, and as its linear and bmm formulas for the rest).
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


def _mha_flops(query: Any, key: Any, value: Any, embed_dim: int, num_heads: int, *args: Any,
               out_shape: Any = None, **kwargs: Any) -> int:
    """PyTorch's fused ``nn.MultiheadAttention`` (eval, no grad): Q from (B, Lq, E), K and V
    from (B, Lk, E), E x E projections each, scores and weighted sum, output projection."""
    b, lq, e = query[0], query[-2], embed_dim
    lk = key[-2]
    projections = 2 * b * lq * e * e * 2 + 2 * b * lk * e * e * 2  # Q, output; K, V
    return int(projections + 2 * 2 * b * lq * lk * e)


def _encoder_layer_flops(src: Any, embed_dim: int, num_heads: int, qkv_weight: Any, *args: Any,
                         out_shape: Any = None, **kwargs: Any) -> int:
    """PyTorch's fused ``nn.TransformerEncoderLayer`` (eval, no grad): the attention above on
    (B, L, E) and the feed-forward E -> F -> E (F: ``ffn_weight_1``'s rows)."""
    b, length, e = src[0], src[-2], embed_dim
    ffn_1 = kwargs.get("ffn_weight_1", args[10] if len(args) > 10 else None)  # (F, E)
    f = ffn_1[0] if ffn_1 is not None else 0
    attention = 2 * b * length * e * 3 * e + 2 * 2 * b * length * length * e
    attention += 2 * b * length * e * e
    return int(attention + 2 * 2 * b * length * e * f)


def _formulas() -> dict[Any, Callable[..., int]]:
    table = dict(flop_counter.flop_registry)
    extra = {"_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
             "_native_multi_head_attention": _mha_flops,
             "_transformer_encoder_layer_fwd": _encoder_layer_flops}
    for name, formula in extra.items():
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in table:
            table[op] = flop_counter.shape_wrapper(formula)
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

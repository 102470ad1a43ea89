"""The packed few-row product: ``F.linear`` through oneDNN on a copy of the weight laid out
once for its matrix kernels (see :mod:`exitwise.backbones.kernels` for where it is used).

A BLAS product re-packs (re-lays-out) its weight operand on every call when the other operand
has only a few rows; at batch 1 a decoder step is bound by reading the weights from memory, so
that repacking can make a product of two to four rows cost far more than one of a single row.
oneDNN can lay a weight out for its kernels once (``torch.ops.mkldnn._reorder_linear_weight``,
what ``torch.compile``'s CPU freezing pass uses) and then multiply any number of rows by it
without repacking (``torch.ops.mkldnn._linear_pointwise``). Products equal ``F.linear`` up to
round-off (not bit for bit).

The cost is memory: one packed copy of every weight that takes this path, kept while the
weight lives (dropped when it is garbage-collected, rebuilt when it is modified in place).
Only float32 weights on a CPU whose PyTorch build has oneDNN; :func:`packed_available` says.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Sequence

import torch

_packed: dict[int, tuple[int, torch.Tensor]] = {}  # id(weight) -> (its _version, packed copy)
_lock = threading.Lock()


@functools.cache
def packed_available() -> bool:
    """Whether this PyTorch build can pack float32 weights for oneDNN (tried on a tiny one)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w, x = torch.ones(3, 2), torch.ones(1, 2)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out, x @ w.t()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def can_pack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` may take the packed path (a float32 CPU matrix, oneDNN available)."""
    return (weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and packed_available())


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of ``weight`` (out, in), made at first use and after in-place changes."""
    key = id(weight)
    entry = _packed.get(key)
    if entry is not None and entry[0] == weight._version:
        return entry[1]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    with _lock:
        if key not in _packed:  # first time: forget the copy when the weight goes away
            weakref.finalize(weight, _packed.pop, key, None)
        _packed[key] = (weight._version, packed)
    return packed


def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the packed copy of ``weight``.
    x: (..., in); weight: (out, in) float32 (see :func:`can_pack`); returns (..., out)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight(weight), bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def forget_packed(weights: Sequence[torch.Tensor]) -> None:
    """Drop the packed copies of ``weights`` (e.g. measured, then not chosen)."""
    with _lock:
        for w in weights:
            _packed.pop(id(w), None)


def clear_packed() -> None:
    """Drop every packed copy (their memory) now; they are rebuilt at next use."""
    with _lock:
        _packed.clear()

"""Few-row linear layers that read their weight once: the CPU side of cheap decoding steps.

Speculative decoding pays off when checking k + 1 tokens costs about as much as one step. On
a GPU that holds by itself. On a CPU at batch 1 a decoder step is bound by streaming the
weights from memory, so it *could* hold too, but ``F.linear`` on a handful of rows takes
MKL's general GEMM path, which here costs about 2x a one-row product for 2-5 rows. Computing
the same product as ``(W @ x^T)^T`` hands MKL a tall-skinny GEMM that streams ``W`` once.

One row is a matrix-vector product, and MKL's GEMV streams a large weight *slower* than its
two-column GEMM does (SmolLM2's LM head, 49152 x 576, two threads: 15.9 ms for one row with
``F.linear``, 11.1 ms padded to two; an odd third column also cost more than a fourth in a
micro-benchmark). So an odd row count is padded with one zero row: 1 -> 2, 3 -> 4, ... The
pad costs one small copy and the extra output column is dropped; the products of the real
rows are unchanged up to round-off.

``benchmarks/lm_speed.py`` records stock vs streaming in ``component_costs_ms`` (``streaming_``
keys): on SmolLM2 at batch 1, two threads, the one-token step, the two-token verification and
the LM head for each.

:func:`streaming_linears` switches the exact-``nn.Linear`` modules of a model to
:class:`StreamingLinear` for the duration of a ``with`` block (the class of each module is
swapped in place and back, so every reference to a module sees the change and no weight is
copied). A StreamingLinear computes inputs of 1..``max_rows`` rows as above and everything else
(more rows, autograd, CUDA) exactly as ``nn.Linear`` does. The result equals ``F.linear`` up
to float round-off, not bit for bit: greedy decoding with these kernels can differ from a
stock run only where the two best logits tie to within round-off.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

DEFAULT_MAX_ROWS = 8


class StreamingLinear(nn.Linear):
    """``nn.Linear`` whose few-row products stream the weight once (see module doc).

    ``max_rows`` is a class attribute set by :func:`streaming_linears`; instances carry no
    extra state, so swapping the class of a live ``nn.Linear`` is safe.
    """

    max_rows: int = DEFAULT_MAX_ROWS

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
        rows = input.numel() // max(input.shape[-1], 1)
        if not 1 <= rows <= self.max_rows or input.device.type != "cpu" or (
            torch.is_grad_enabled()
        ):
            return super().forward(input)
        flat = input.reshape(rows, input.shape[-1])
        if rows % 2:  # an even column count gets MKL's fast GEMM kernel (see module doc)
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        # (N, rows): W read once. Made contiguous (rows x N floats, a trivial copy): the
        # transposed view would make every later op of the block run on strided memory,
        # which costs more than the product saves.
        out = torch.mm(self.weight, flat.t())[:, :rows].t().contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*input.shape[:-1], self.out_features)


@contextmanager
def streaming_linears(
    *modules: nn.Module | None, max_rows: int = DEFAULT_MAX_ROWS, enabled: bool = True
) -> Iterator[int]:
    """Within the block, every module of exact type ``nn.Linear`` under ``modules`` on the
    CPU computes 1..``max_rows``-row inputs as ``(W @ x^T)^T`` (odd counts padded by a row).
    Yields how many were switched; restores them on exit (also on error). ``enabled=False``
    switches none."""
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1; got {max_rows!r}")
    switched: list[nn.Module] = []
    seen: set[int] = set()
    previous = StreamingLinear.max_rows
    if enabled:
        for root in modules:
            if root is None:
                continue
            for m in root.modules():
                if type(m) is nn.Linear and id(m) not in seen and m.weight.device.type == "cpu":
                    seen.add(id(m))
                    switched.append(m)
    StreamingLinear.max_rows = max_rows
    try:
        for m in switched:
            m.__class__ = StreamingLinear
        yield len(switched)
    finally:
        for m in switched:
            m.__class__ = nn.Linear
        StreamingLinear.max_rows = previous

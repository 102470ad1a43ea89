"""Offline replay of an online exit selector (UEE-UCB) on cached all-exit logits.

:func:`replay_stream` mirrors :func:`exitwise.runtime.online.run_stream` step for step: the
same rows in the same order, cut into the same batches, the selector asked for an arm per
batch, and fed the class every exit up to that arm predicted (argmax of the logits scaled by
``1 / temperature[k]`` when it is not 1, as the executor hands them to its policy). Given the
same stream, live and offline runs make the same choices, so a whole stream (or an alpha or
cost sweep) can be studied from one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError
from ..runtime.online import ExitSelector, StreamResult, StreamStep, check_stream_task
from ..temperatures import temperature_list
from .cache import ExitLogitsCache


def _chunks(order: list[int], batch_size: int | Sequence[int]) -> list[list[int]]:
    """``order`` cut into batches of ``batch_size`` rows (the last one shorter), or into the
    given sizes (which must add up to the rows)."""
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sizes = [int(s) for s in batch_size]
    if any(s < 1 for s in sizes) or sum(sizes) != len(order):
        raise InputError(f"batch sizes {sizes} must be >= 1 and add up to the "
                         f"{len(order)} rows of the stream")
    out, start = [], 0
    for s in sizes:
        out.append(order[start:start + s])
        start += s
    return out


def replay_stream(
    cache: ExitLogitsCache,
    selector: ExitSelector,
    batch_size: int | Sequence[int] = 1,
    order: Sequence[int] | None = None,
    temperatures: torch.Tensor | Sequence[float] | None = None,
) -> StreamResult:
    """Run ``selector`` over the cached rows as :func:`~exitwise.runtime.online.run_stream`
    would over the same inputs.

    batch_size: rows per decision (1: one decision per input, the paper's setting), or the
        list of batch sizes of a live run (``result.sizes``).
    order: the rows of the cache in stream order (e.g. :func:`~exitwise.runtime.online.
        stream_order`); default: cache order. Resuming: replay ``order[k:]`` with a selector
        restored from the state after ``order[:k]``.
    temperatures: (E,) per-exit temperatures (``model.temperatures``); None = 1.
    The selector is updated in place. Costs per row come from ``cache.costs`` at the arm.
    """
    cache.check()
    check_stream_task(cache.task, selector, cache.num_exits)
    if cache.skipped is not None:  # as run_stream: rows cannot all stop at a skipped exit
        raise InputError("a cache of a model with a skip gate cannot be streamed: a row that "
                         "skipped the chosen exit's block cannot stop there")
    temps = temperature_list(temperatures, cache.num_exits)
    n = cache.num_examples
    rows = list(range(n)) if order is None else [int(i) for i in order]
    if any(not 0 <= i < n for i in rows):
        raise InputError(f"order has row indices outside [0, {n})")
    result = StreamResult()
    for chunk in _chunks(rows, batch_size):
        idx = torch.tensor(chunk, dtype=torch.long)
        arm = int(selector.select())
        seen = []
        for k in range(arm + 1):
            logits = cache.logits[idx, k]
            if temps[k] != 1.0:
                logits = logits / temps[k]
            seen.append(logits.argmax(-1))
        preds = torch.stack(seen, dim=1)
        rewards = selector.update(arm, preds)
        result.steps.append(StreamStep(
            arm=arm, exit_layer=int(cache.exit_layers[arm]), rows=len(chunk),
            reward=float(rewards.mean()), predictions=preds[:, arm].clone(),
            labels=cache.labels[idx].long(), flops=cache.costs[idx, arm].clone(),
        ))
    result.selector_state = selector.state_dict()
    return result

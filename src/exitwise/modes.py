"""Train / eval mode, switched for a block of inference and restored exactly afterwards.

Measuring or running a model must not change it: a BatchNorm in train mode normalizes with
the batch's statistics and updates its running ones, so one forward pass of a blank example
(placing exits by FLOPs) or of a user's batch (early-exit inference) would alter the model the
user holds. ``model.train(was_training)`` is not a restore either: it sets every submodule to
one mode, while a user may keep parts in the other (a frozen BatchNorm in eval mode inside a
training model). So each module's own flag is recorded and put back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block every submodule of ``module`` is in eval mode; afterwards (also after
    an exception) each one's own ``training`` flag is what it was before."""
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in saved:
            m.training = mode


def for_inference(module: nn.Module) -> AbstractContextManager[Any]:
    """:func:`eval_mode` for a module in train mode (as training leaves it); nothing for one
    already in eval mode, the usual case of a timed inference call, which then pays no walk
    over its modules."""
    return eval_mode(module) if module.training else nullcontext()

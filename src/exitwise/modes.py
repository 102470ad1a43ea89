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
from contextlib import contextmanager

from torch import nn


def saved_modes(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule of ``module`` with its own ``training`` flag, for :func:`restore_modes`."""
    return [(m, m.training) for m in module.modules()]


def restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    """Put back the flags :func:`saved_modes` recorded, module by module."""
    for m, mode in saved:
        m.training = mode


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block every submodule of ``module`` is in eval mode; afterwards (also after
    an exception) each one's own ``training`` flag is what it was before."""
    saved = saved_modes(module)
    module.eval()
    try:
        yield module
    finally:
        restore_modes(saved)

"""Skip gates: a learned per-row decision to leave a block out, which the runtime obeys.

Layer-skipping methods (SmartBERT) put a small classifier in front of every block: it reads the
block's *input* and says, per row, whether the block is worth running. A gate is one module
attached to a :class:`~exitwise.model.MultiExitModel` (``model.attach_gate(name)``), saved with
the heads, and obeyed by every path that runs blocks: ``forward``, the executor and the logits
cache all call ``model.block_step(i, state)``, which asks the gate and runs block i only on the
rows it lets in (:meth:`~exitwise.backbones.base.Backbone.step_rows`); the rows that skip keep
their state and are not computed at all.

A row that skipped the block an exit sits on is not offered that exit (the exit's classifier
was trained on the output of a block the row did not run): the executor masks the policy's
decision there, and the logits cache records the mask (``ExitLogitsCache.skipped``) so that
the offline replay masks the same decisions. The exit's head still runs on those rows (its
answer is ignored for them, and counted in their FLOPs), so that a policy is asked once per
exit on the whole batch and its per-row state keeps one shape; a stateful policy (patience)
thus sees those answers too. The gates decide with a hard rule
(``probability >= threshold``) that depends only on the row, so the cache holds exactly the
gated run the executor makes.

Each gate kind is one file registered in :data:`GATES` (e.g. ``heads/smartbert.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

GATES: Registry[type[SkipGate]] = Registry("skip gate")
register_gate = GATES.register


class SkipGate(nn.Module):
    """Base class: one gate in front of each of the backbone's blocks.

    ``input_dims[i]`` is the width of block i's input. Subclasses implement :meth:`forward`
    and :meth:`gate_flops`, and keep their JSON-able options in ``self.options`` (saved with
    the model and given back to ``__init__`` on load; ``threshold`` among them).
    """

    registered_name: str = "?"

    def __init__(self, input_dims: list[int], threshold: float = 0.5, **options: Any) -> None:
        super().__init__()
        if not input_dims:
            raise ConfigError("a skip gate needs at least one block")
        self.input_dims = [int(d) for d in input_dims]
        self.options: dict[str, Any] = dict(options)
        self.threshold = threshold

    @property
    def num_layers(self) -> int:
        return len(self.input_dims)

    @property
    def threshold(self) -> float:
        """A row skips block i when the gate's probability is >= this (above 1: never)."""
        return float(self.options["threshold"])

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not float(value) > 0.0:
            raise ConfigError(f"the skip threshold must be > 0, got {value}")
        self.options["threshold"] = float(value)

    def forward(self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) the probability that block ``i`` is skipped, from its input ``hidden``
        ((B, T, H) with ``mask`` (B, T) for token models)."""
        raise NotImplementedError  # pragma: no cover

    def skip(self, i: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) bool: the rows that do not run block ``i`` (probability >= threshold)."""
        return self(i, hidden, mask) >= self.threshold

    def gate_flops(self, i: int, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """(B,) float64 FLOPs of deciding block ``i`` for each row."""
        raise NotImplementedError  # pragma: no cover


def build_gate(name: str, input_dims: list[int], **options: Any) -> SkipGate:
    cls = GATES.get(name)
    try:
        return cls(input_dims, **options)
    except TypeError as err:
        raise ConfigError(f"bad options for skip gate {name!r}: {err}") from None

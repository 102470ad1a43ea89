"""Adapter for any ``nn.Sequential`` or list of blocks.

Each block maps the previous activations to the next; exits can sit after any block. FLOPs per
block are measured with torch's FLOP formulas (:mod:`.flop_count`) on a one-row example of
each input shape the network meets (a convolution's cost grows with the image), because a
generic block's cost cannot be read off a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..modes import eval_mode
from .base import Backbone, BackboneState, OwnClassifier
from .flop_count import FlopCount


@dataclass
class _Profile:
    """What one row of a given input shape costs and produces."""

    stem_flops: float
    block_flops: list[float]
    widths: list[int]  # channels (dim 1) after each block
    positions: list[int]  # H x W of a map, T of a (B, T, H) sequence, 1 for a vector


def _positions(x: torch.Tensor) -> int:
    if x.dim() >= 4:
        return max(1, int(x[0, 0].numel()))
    return int(x.shape[1]) if x.dim() == 3 else 1


class SequentialBackbone(Backbone):
    """``blocks[i]`` is block i; ``stem`` (optional) runs once in ``start``; ``classifier``
    (optional) is the network's own classifier on the last block's output, which then becomes
    the final exit unchanged (head ``native``).

    Inputs: ``start(pixel_values=x)`` for images or ``start(inputs=x)``, x of shape (B, ...).
    ``example`` (one input row, batch dim included) lets the adapter learn each block's output
    width and FLOPs; without it both are learned lazily on the first batch.
    """

    family = "sequential"

    def __init__(
        self,
        blocks: Sequence[nn.Module] | nn.Sequential,
        stem: nn.Module | None = None,
        example: torch.Tensor | None = None,
        classifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ConfigError("a sequential backbone needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.stem = stem
        # Not registered here: the native final exit holds it (one owner, one name).
        self._classifier = [classifier] if classifier is not None else []
        self.num_layers = len(blocks)
        self._dims: list[int] | None = None  # widths, from the first input seen
        self._profiles: dict[tuple[int, ...], _Profile] = {}  # by input shape (batch dim off)
        self._last_shape: tuple[int, ...] | None = None
        self._example: torch.Tensor | None = None
        if example is not None:
            self.profile(example)

    @torch.no_grad()
    def profile(self, example: torch.Tensor) -> None:
        """Run one row through, recording each block's output width and FLOPs for inputs of
        the example's shape (the first example is also what placing exits by FLOPs runs)."""
        x = example[:1]
        with eval_mode(self):
            profile = self._measure(x)
        self._profiles[tuple(x.shape[1:])] = profile
        if self._example is None:
            self._dims = profile.widths
            self._example = x.detach().clone()

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """The profiled example row, repeated to (batch_size, ...); ConfigError before one
        was given (``example=`` or a first batch)."""
        if self._example is None:
            raise ConfigError(
                "this SequentialBackbone has not seen an input yet: build it with "
                "example=<one input batch> to place exits by FLOPs")
        return self._example.expand(batch_size, *self._example.shape[1:]).clone()

    def _measure(self, x: torch.Tensor) -> _Profile:
        with FlopCount() as counter:
            x = self.stem(x) if self.stem is not None else x
        stem_flops, flops, dims, positions = float(counter.total), [], [], []
        for block in self.blocks:
            with FlopCount() as counter:
                x = block(x)
            flops.append(float(counter.total))
            dims.append(int(x.shape[1]) if x.dim() > 1 else 1)
            positions.append(_positions(x))
        return _Profile(stem_flops, flops, dims, positions)

    def own_classifier(self) -> OwnClassifier | None:
        """The ``classifier`` given, applied to the last block's output; None without one."""
        if not self._classifier:
            return None
        module = self._classifier[0]
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("the classifier of a SequentialBackbone must end in nn.Linear")
        return OwnClassifier("features", {"classifier": module}, int(linears[-1].out_features))

    def feature_dim(self, layer: int) -> int:
        if self._dims is None:
            raise ConfigError(
                "a sequential network needs an example input to know each block's width: "
                "wrap it as exitwise.SequentialBackbone(blocks, example=<one input batch>) "
                "and attach the exits to that"
            )
        return self._dims[layer - 1]

    def start(self, pixel_values: torch.Tensor | None = None, inputs: torch.Tensor | None = None,
              **extra: Any) -> BackboneState:
        """``pixel_values`` (B, C, H, W) for image networks (Hugging Face's name, as every
        vision entry point), or ``inputs`` (B, ...) for anything else; one of them."""
        if extra:
            raise InputError(
                f"unexpected inputs {sorted(extra)}: a sequential network takes "
                "pixel_values=<images> or inputs=<tensor>"
            )
        if (pixel_values is None) == (inputs is None):
            raise InputError("give the input tensor as pixel_values=... (images) or inputs=...")
        x = pixel_values if pixel_values is not None else inputs
        if not isinstance(x, torch.Tensor):
            raise InputError(f"the input must be a tensor, got {type(x).__name__}")
        self.check_batch(int(x.shape[0]))
        shape = tuple(int(n) for n in x.shape[1:])
        if shape not in self._profiles:
            self.profile(x)  # a one-row trial run at this shape: its FLOPs and widths
        self._last_shape = shape
        hidden = self.stem(x) if self.stem is not None else x
        return BackboneState(hidden=hidden, shared={"input_shape": shape})

    def reference(self, pixel_values: torch.Tensor | None = None,
                  inputs: torch.Tensor | None = None, **extra: Any):
        """Plain sequential forward: (output, None)."""
        state = self.start(pixel_values, inputs, **extra)
        for block in self.blocks:
            state.hidden = block(state.hidden)
        return state.hidden, None

    def step(self, i: int, state: BackboneState) -> BackboneState:
        state.hidden = self.blocks[i](state.hidden)
        return state

    def keep(self, state: BackboneState, rows: torch.Tensor) -> BackboneState:
        new = super().keep(state, rows)
        new.shared.update(state.shared)  # the input shape does not depend on the rows
        return new

    def _profile_of(self, state: BackboneState) -> _Profile:
        # The executor passes views of the state without ``shared`` (runtime.flops.padded);
        # they belong to the batch of the latest ``start``.
        shape = state.shared.get("input_shape") or self._last_shape
        if shape is None or shape not in self._profiles:
            raise ConfigError("this SequentialBackbone has not seen an input yet")
        return self._profiles[shape]

    def feature_positions(self, layer: int, state: BackboneState) -> int:
        return self._profile_of(state).positions[layer - 1]

    def layer_flops(self, i: int, state: BackboneState) -> torch.Tensor:
        value = self._profile_of(state).block_flops[i]
        return torch.full((state.batch_size,), value, dtype=torch.float64)

    def start_flops(self, state: BackboneState) -> torch.Tensor:
        value = self._profile_of(state).stem_flops
        return torch.full((state.batch_size,), value, dtype=torch.float64)

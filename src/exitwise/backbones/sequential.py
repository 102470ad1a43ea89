"""Adapter for any ``nn.Sequential`` or list of blocks.

Each block maps the previous activations to the next; exits can sit after any block. FLOPs per
block are measured once with ``torch.utils.flop_counter`` on a one-row example, because a
generic block's cost cannot be read off a config.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError, InputError
from ..modes import eval_mode
from .base import Backbone, BackboneState, OwnClassifier


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
        self._dims: list[int] | None = None
        self._flops: list[float] | None = None
        self._example: torch.Tensor | None = None
        self._stem_flops = 0.0
        if example is not None:
            self.profile(example)

    @torch.no_grad()
    def profile(self, example: torch.Tensor) -> None:
        """Run one row through, recording each block's output width and FLOPs."""
        x = example[:1]
        with eval_mode(self):
            self._dims, self._flops, self._stem_flops = self._measure(x)
        self._example = x.detach().clone()  # what placing exits by FLOPs runs again

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """The profiled example row, repeated to (batch_size, ...); ConfigError before one
        was given (``example=`` or a first batch)."""
        if self._example is None:
            raise ConfigError(
                "this SequentialBackbone has not seen an input yet: build it with "
                "example=<one input batch> to place exits by FLOPs")
        return self._example.expand(batch_size, *self._example.shape[1:]).clone()

    def _measure(self, x: torch.Tensor) -> tuple[list[int], list[float], float]:
        dims, flops = [], []
        counter = FlopCounterMode(display=False)
        with counter:
            x = self.stem(x) if self.stem is not None else x
        stem_flops = float(counter.get_total_flops())
        for block in self.blocks:
            counter = FlopCounterMode(display=False)
            with counter:
                x = block(x)
            flops.append(float(counter.get_total_flops()))
            dims.append(int(x.shape[1]) if x.dim() > 1 else 1)
        return dims, flops, stem_flops

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
        if self._dims is None:
            self.profile(x)
        hidden = self.stem(x) if self.stem is not None else x
        return BackboneState(hidden=hidden)

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

    def layer_flops(self, i: int, state: BackboneState) -> torch.Tensor:
        assert self._flops is not None
        return torch.full((state.batch_size,), self._flops[i], dtype=torch.float64)

    def start_flops(self, state: BackboneState) -> torch.Tensor:
        return torch.full((state.batch_size,), self._stem_flops, dtype=torch.float64)

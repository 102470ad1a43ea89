"""Output containers returned by models and the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExitOutputs:
    """All exits' logits from one forward pass.

    logits: one (B, num_labels) tensor per exit, shallowest first; ``logits[-1]`` is the final
        classifier. loss: set by training strategies.
    features: only when the forward pass was asked for them (``return_features=True``): per
        exit, the (B, D_k) vector its head's classifier layer reads (None for a head without
        one); recipes that match representations across exits (self-distillation hints) use it.
    scores: only for a model with an exit scorer (``attach_scorer``): per exit, (B,) scores.
    """

    logits: list[torch.Tensor]
    loss: torch.Tensor | None = None
    features: list[torch.Tensor | None] | None = None
    scores: list[torch.Tensor] | None = None

    def stacked(self) -> torch.Tensor:
        """(B, num_exits, num_labels)."""
        return torch.stack(self.logits, dim=1)


@dataclass
class EarlyExitResult:
    """What the real early-exit executor returns.

    logits:     (B, C) the logits of the exit each row left at (temperature-scaled).
    exit_index: (B,) index into the model's exits.
    exit_layer: (B,) depth (blocks run) at which each row left.
    flops:      (B,) FLOPs each row cost, counting its real tokens (embedding, blocks, heads).
    executed_flops: FLOPs actually executed including padding, summed over the batch.
    layer_seconds:  wall-clock per block (summed over the batch), when profiling.
    rows_per_layer: how many rows entered each block.
    task:       "classification" or "regression" (one output per row).
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    exit_layer: torch.Tensor
    flops: torch.Tensor
    executed_flops: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)
    rows_per_layer: list[int] = field(default_factory=list)
    task: str = "classification"

    @property
    def predictions(self) -> torch.Tensor:
        """(B,) the arg-max class, or the predicted value for regression."""
        return self.logits[:, 0] if self.task == "regression" else self.logits.argmax(-1)

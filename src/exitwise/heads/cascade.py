"""``cascade``: an exit head that also reads the previous exit's logits, and the learned
geometric ensemble of Zero Time Waste.

Cascade heads (Wołczyk et al., "Zero Time Waste", NeurIPS 2021; the same wiring is IMTA's
inline subnetwork collaboration, Li et al. 2019, and BoostNet's additive model, Yu et al.
2023) reuse what the earlier exits already computed instead of wasting it. The head wraps a
registered ``base`` head (``sdn`` by default, ZTW's internal classifier) and combines its
logits ``f(hidden)`` (B, C) with the previous exit's logits ``z_prev`` (B, C):

- ``combine="linear"`` (ZTW, IMTA): ``f(hidden) + W log_softmax(z_prev)``, i.e. a linear layer
  over [pooled features; previous prediction]. ``W`` (C, C) starts at zero, so a fresh head is
  its base head. The first exit has no previous exit and reads the uniform prediction
  ``log(1/C)`` in its place, so every exit is the same function of its inputs.
- ``combine="additive"`` (BoostNet): ``z_prev + f(hidden)``: exit k outputs the running sum of
  all heads up to k, each head fitting the residual of the ones before it.

``detach_previous=True`` (ZTW, BoostNet) stops gradients at ``z_prev`` so that training exit k
never changes the earlier exits; IMTA lets them flow (``False``).

The model, the runtime executor and the logits cache all pass ``previous_logits`` (the raw,
untempered logits of exit k-1) to any head whose class sets ``uses_previous_logits = True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from .base import HEADS, ExitHead, register_head

COMBINES = ("linear", "additive")


@register_head("cascade")
class CascadeHead(ExitHead):
    uses_previous_logits = True

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        base: str = "sdn",
        combine: str = "linear",
        detach_previous: bool = True,
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        if base == "cascade" or base not in HEADS.names():
            raise ConfigError(
                f"cascade base must be another registered head ({', '.join(HEADS.names())}), "
                f"got {base!r}"
            )
        if HEADS.get(base).backbone_families is not None:
            raise ConfigError(f"the {base!r} head cannot be a cascade base (it is family-bound)")
        if combine not in COMBINES:
            raise ConfigError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.base_name, self.combine, self.detach_previous = base, combine, bool(detach_previous)
        try:
            self.base = HEADS.get(base)(
                in_features, num_labels, dropout=dropout, **(base_kwargs or {})
            )
        except TypeError as err:
            raise ConfigError(f"bad base_kwargs for cascade base {base!r}: {err}") from None
        # W of the linear combination, zero at the start: a fresh cascade head is its base head.
        self.previous = (
            nn.Linear(num_labels, num_labels, bias=False) if combine == "linear" else None
        )
        if self.previous is not None:
            nn.init.zeros_(self.previous.weight)

    @property
    def feature_layer(self) -> nn.Module | None:
        """The base head's classifier layer (what self-distillation hints read the input of)."""
        from . import classifier_layer

        return classifier_layer(self.base)

    def init_from_backbone(self, backbone: nn.Module) -> None:
        self.base.init_from_backbone(backbone)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        previous_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden as the base head reads it; previous_logits (B, C) or None (first exit)."""
        own = self.base(hidden, mask)
        if previous_logits is not None:
            if previous_logits.shape != own.shape:
                raise InputError(
                    f"previous logits have shape {tuple(previous_logits.shape)}, this exit "
                    f"gives {tuple(own.shape)}"
                )
            if self.detach_previous:
                previous_logits = previous_logits.detach()
        if self.combine == "additive":
            return own if previous_logits is None else own + previous_logits.to(own.dtype)
        if previous_logits is None:  # the uniform prediction stands in for a missing exit
            prior = own.new_full(own.shape, -math.log(self.num_labels))
        else:
            prior = F.log_softmax(previous_logits.float(), -1).to(own.dtype)
        return own + self.previous(prior)

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        extra = (
            self.linear_flops(self.previous) if self.previous is not None else self.num_labels
        )
        return self.base.head_flops(mask, batch_size) + extra


class GeometricEnsemble(nn.Module):
    """ZTW's learned geometric ensemble over exits 0..k, for every exit k.

    ``q_k ∝ exp(b_k) * prod_{j<=k} p_j ** w_kj`` with ``w_kj >= 0`` (softplus of a free
    parameter; entries above the diagonal are unused) and a per-class bias ``b_k`` (C,). In
    logits: ``log q_k = b_k + sum_{j<=k} w_kj log_softmax(z_j)`` (+ a normaliser).

    raw_weight: (K, K), bias: (K, C). It starts near each exit's own prediction (w_kk = 1,
    w_kj ≈ 0.02 for j < k, b = 0).
    """

    def __init__(self, num_exits: int, num_labels: int) -> None:
        super().__init__()
        if num_exits < 1 or num_labels < 1:
            raise ConfigError("an ensemble needs at least one exit and one class")
        self.num_exits, self.num_labels = int(num_exits), int(num_labels)
        init = torch.full((num_exits, num_exits), -4.0)
        init.fill_diagonal_(math.log(math.e - 1.0))  # softplus^-1(1)
        self.raw_weight = nn.Parameter(init)
        self.bias = nn.Parameter(torch.zeros(num_exits, num_labels))
        self.register_buffer(
            "lower", torch.tril(torch.ones(num_exits, num_exits)), persistent=False
        )

    @property
    def weights(self) -> torch.Tensor:
        """(K, K) non-negative, zero above the diagonal: row k weighs exits 0..k."""
        return F.softplus(self.raw_weight) * self.lower

    def forward(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Raw exit logits (B, K, C) (or a list of K (B, C)) -> ensemble logits (B, K, C)."""
        z = torch.stack(list(logits), 1) if isinstance(logits, (list, tuple)) else logits
        if z.dim() != 3 or z.shape[1] != self.num_exits or z.shape[2] != self.num_labels:
            raise InputError(
                f"the ensemble expects logits (B, {self.num_exits}, {self.num_labels}); "
                f"got {tuple(z.shape)}"
            )
        logp = F.log_softmax(z.float(), -1)  # (B, K, C)
        return torch.einsum("kj,bjc->bkc", self.weights, logp) + self.bias

    def to_dict(self) -> dict[str, list]:
        """JSON-able ``{"weights": K x K, "bias": K x C}`` (what the ``ztw`` policy reads)."""
        return {
            "weights": self.weights.detach().cpu().double().tolist(),
            "bias": self.bias.detach().cpu().double().tolist(),
        }

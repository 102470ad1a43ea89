"""``cascade``: an exit head that also reads the previous exit's logits, and the learned
geometric ensemble of Zero Time Waste.

Cascade heads reuse what the earlier exits already computed. The head wraps a registered
``base`` head (``sdn`` by default) whose logits are ``f(hidden) = W_f phi(hidden) + b`` (B, C)
(``phi``: the base's pooled feature, the input of its classifier layer) and combines them with
the previous exit's raw logits ``z_prev`` (B, C):

- ``combine="linear"`` (ZTW, Wołczyk et al., NeurIPS 2021; reference:
  ``gmum/Zero-Time-Waste`` ``ztw_cv/architectures/early_exits/heads.py``, the
  ``*CascadingHead`` classes): ``f(hidden) + W LayerNorm(z_prev)``, i.e. ONE linear layer over
  the concatenation ``[phi; LayerNorm(z_prev)]`` written as the sum of its two blocks. The
  LayerNorm (C,) is learned, as in the reference ("layer norm to previous logits", ZTW's
  appendix).
- ``combine="isc"`` (IMTA's inline subnetwork collaboration, Li et al., ICCV 2019; reference:
  ``kalviny/IMTA`` ``models/msdnet_imta.py``): the previous logits go through
  ``ReLU(BatchNorm1d(Linear(C -> D)))`` and are concatenated with the features before the
  classifier: ``f(hidden) + W isc(z_prev)``, W (C, D). ``D`` (``isc_features``) defaults to
  the width of the base head's classifier input, as the reference sizes the collaboration
  features like the classifier's own.
- ``combine="additive"`` (BoostNet, Yu et al., AAAI 2023; reference:
  ``SHI-Labs/Boosted-Dynamic-Networks`` ``models/dynamic_net.py``, ``DynamicNet.forward``):
  ``f(hidden) + reweight * z_prev``: exit k outputs ``F_k = f_k + r_k F_{k-1}``, the boosted
  ensemble with BoostNet's prediction reweighting ``r_k`` (``reweight``; 1 = the plain sum).

The first exit has no previous exit and outputs its base head's logits (the reference's first
head has no cascading input). ``detach_previous=True`` (ZTW, BoostNet) stops gradients at
``z_prev``; IMTA lets them flow (``False``).

Deviations from the references: the link ``W`` starts at zero (a fresh cascade head is its
base head; the references initialise the concatenated layer as one ``nn.Linear``); the base
head's dropout applies to ``phi`` only. The model, the runtime executor and the logits cache
pass ``previous_logits`` (the raw, untempered logits of exit k-1) to any head whose class sets
``uses_previous_logits = True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..options import flag
from .base import HEADS, ExitHead, classifier_layer, register_head

COMBINES = ("linear", "isc", "additive")


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
        reweight: float = 1.0,
        isc_features: int | None = None,
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
        if not math.isfinite(float(reweight)) or float(reweight) < 0:
            raise ConfigError(f"reweight must be a finite number >= 0, got {reweight!r}")
        if reweight != 1.0 and combine != "additive":
            raise ConfigError("reweight is BoostNet's prediction reweighting: combine='additive'")
        if isc_features is not None and combine != "isc":
            raise ConfigError("isc_features sizes IMTA's collaboration layer: combine='isc'")
        self.base_name, self.combine = base, combine
        self.detach_previous = flag("cascade head", "detach_previous", detach_previous)
        self.reweight = float(reweight)
        try:
            self.base = HEADS.get(base)(
                in_features, num_labels, dropout=dropout, **(base_kwargs or {})
            )
        except TypeError as err:
            raise ConfigError(f"bad base_kwargs for cascade base {base!r}: {err}") from None
        self.norm: nn.Module | None = None
        self.isc: nn.Sequential | None = None
        self.previous: nn.Linear | None = None
        if combine == "linear":
            self.norm = nn.LayerNorm(num_labels)
            self.previous = nn.Linear(num_labels, num_labels, bias=False)
        elif combine == "isc":
            width = isc_features or getattr(self.feature_layer, "in_features", None) or in_features
            if not isinstance(width, int) or width < 1:
                raise ConfigError(f"isc_features must be a positive int, got {isc_features!r}")
            self.isc = nn.Sequential(
                nn.Linear(num_labels, width), nn.BatchNorm1d(width), nn.ReLU()
            )
            self.previous = nn.Linear(width, num_labels, bias=False)
        if self.previous is not None:  # zero link: a fresh cascade head is its base head
            nn.init.zeros_(self.previous.weight)

    @property
    def feature_layer(self) -> nn.Module | None:
        """The base head's classifier layer (what self-distillation hints read the input of)."""
        return classifier_layer(self.base)

    @property
    def link_modules(self) -> list[nn.Module]:
        """The modules that read the previous logits (empty for ``additive``)."""
        return [m for m in (self.norm, self.isc, self.previous) if m is not None]

    def init_from_backbone(self, backbone: nn.Module) -> None:
        self.base.init_from_backbone(backbone)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        previous_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden as the base head reads it; previous_logits (B, C) or None (first exit).
        Returns (B, C) logits."""
        own = self.base(hidden, mask)
        if previous_logits is None:  # the first exit: nothing to reuse yet
            return own
        if previous_logits.shape != own.shape:
            raise InputError(
                f"previous logits have shape {tuple(previous_logits.shape)}, this exit "
                f"gives {tuple(own.shape)}"
            )
        prev = previous_logits.detach() if self.detach_previous else previous_logits
        if self.combine == "additive":
            return own + self.reweight * prev.to(own.dtype)
        assert self.previous is not None
        if self.combine == "linear":
            assert self.norm is not None
            return own + self.previous(self.norm(prev.to(own.dtype)))
        assert self.isc is not None
        return own + self.previous(self.isc(prev.to(own.dtype)))

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        extra = float(self.num_labels)  # the add (and LayerNorm / reweighting) per class
        if self.previous is not None:
            extra += self.linear_flops(self.previous)
        if self.isc is not None:
            extra += self.linear_flops(self.isc[0])
        return self.base.head_flops(mask, batch_size) + extra


class GeometricEnsemble(nn.Module):
    """ZTW's learned geometric ensemble over the internal classifiers 0..k, for every IC k.

    Reference: ``gmum/Zero-Time-Waste`` ``ztw_cv/architectures/early_exits/ztw.py``
    (``GeometricWeightedEnsemble``, ``ZTWEnsembling``): ensemble k reads the
    log-probabilities of ICs 0..k, ``s_k = mean_{j<=k} exp(a_kj) log p_j + b_k``, so
    ``w_kj = exp(a_kj) / (k + 1) > 0``, with a per-class bias ``b_k`` (C,). ZTW builds no
    ensemble on the backbone's own final head: give this module the number of ICs (the
    model's exits but the final one).

    raw_weight: (E, E) ``a``, entries above the diagonal unused, initialised N(0, 0.01) as
    in the reference; bias: (E, C), zeros.
    """

    def __init__(self, num_members: int, num_labels: int) -> None:
        super().__init__()
        if num_members < 1 or num_labels < 1:
            raise ConfigError(
                "an ensemble needs at least one internal classifier and one class (ZTW's "
                "ensemble covers the exits before the final one)"
            )
        self.num_members, self.num_labels = int(num_members), int(num_labels)
        self.raw_weight = nn.Parameter(torch.randn(num_members, num_members) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_members, num_labels))
        lower = torch.tril(torch.ones(num_members, num_members))
        # row k averages k + 1 members: the reference's mean over heads
        self.register_buffer("lower", lower / lower.sum(1, keepdim=True), persistent=False)

    @property
    def num_exits(self) -> int:
        """Members (the internal classifiers it ensembles)."""
        return self.num_members

    @property
    def weights(self) -> torch.Tensor:
        """(E, E) positive weights, zero above the diagonal: ``w_kj = exp(a_kj) / (k + 1)``."""
        return torch.exp(self.raw_weight) * self.lower

    def forward(self, logits: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Raw IC logits (B, E, C) (or a list of E (B, C)) -> ensemble logits (B, E, C)."""
        z = torch.stack(list(logits), 1) if isinstance(logits, (list, tuple)) else logits
        if z.dim() != 3 or z.shape[1] != self.num_members or z.shape[2] != self.num_labels:
            raise InputError(
                f"the ensemble expects IC logits (B, {self.num_members}, {self.num_labels}); "
                f"got {tuple(z.shape)}"
            )
        logp = torch.log_softmax(z.float(), -1)  # (B, E, C)
        return torch.einsum("kj,bjc->bkc", self.weights, logp) + self.bias

    def to_dict(self) -> dict[str, list]:
        """JSON-able ``{"weights": E x E, "bias": E x C}`` (what the ``ztw`` policy reads; with
        E = exits - 1 the final exit keeps its own prediction)."""
        return {
            "weights": self.weights.detach().cpu().double().tolist(),
            "bias": self.bias.detach().cpu().double().tolist(),
        }

"""Exit heads: small modules that turn a block's features into class logits.

A head reads ``hidden`` of shape (B, T, H) with ``mask`` (B, T) for token models, or (B, H)
for flat features, and returns logits (B, num_labels). Each kind is one file registered by
name in :data:`HEADS`; :func:`build_head` makes one from a name and keyword options.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

HEADS: Registry[type["ExitHead"]] = Registry("exit head")
register_head = HEADS.register


# How a token sequence becomes one vector: mean over the real tokens, or the first ([CLS]).
POOLINGS = ("mean", "first")


class ExitHead(nn.Module):
    """Base class. Subclasses implement ``forward`` and ``head_flops``."""

    registered_name: str = "?"
    # Backbone families this head can read (None: any). The ``lm`` head, for one, shares the
    # final norm and output layer of a decoder and cannot sit on anything else.
    backbone_families: tuple[str, ...] | None = None
    # A head that wraps the model's own classifier: chosen automatically for the final exit
    # of a model that has one, never built standalone.
    needs_own_classifier: bool = False

    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        if num_labels < 1:
            raise ConfigError(f"num_labels must be >= 1, got {num_labels}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """FLOPs this head spends on each row, (B,) float64."""
        raise NotImplementedError  # pragma: no cover

    def init_from_backbone(self, backbone: nn.Module) -> None:
        """Optionally copy weights from the backbone (e.g. its pooler). Default: nothing."""

    @staticmethod
    def first_token(hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, H) the [CLS] position; (B, H) passes through; feature maps
        (B, C, *spatial) from convolutional blocks are averaged over space to (B, C)."""
        if hidden.dim() == 3:
            return hidden[:, 0]
        return ExitHead.spatial_mean(hidden)

    @staticmethod
    def token_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H) with mask (B, T) -> (B, H) mean over the real (unpadded) tokens (over all
        T when mask is None); (B, H) and feature maps go through :meth:`spatial_mean`."""
        if hidden.dim() != 3:
            return ExitHead.spatial_mean(hidden)
        if mask is None:
            return hidden.mean(1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    @staticmethod
    def spatial_mean(hidden: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, C) global average pool; (B, H) passes through.

        Convolutional backbones report ``feature_dim`` = channels (dim 1), so heads pool the
        spatial dims away instead of failing on a 4-D input.
        """
        return hidden.flatten(2).mean(-1) if hidden.dim() > 3 else hidden

    @staticmethod
    def linear_flops(*layers: nn.Linear) -> float:
        return float(sum(2 * m.in_features * m.out_features for m in layers))


def heads_for_family(family: str) -> list[str]:
    """Registered head names one can choose on a backbone of ``family`` (e.g. "sequential");
    ``native`` is left out (it is the model's own classifier, picked automatically)."""
    return [
        n for n in HEADS.names()
        if (HEADS.get(n).backbone_families is None or family in HEADS.get(n).backbone_families)
        and not HEADS.get(n).needs_own_classifier
    ]


def build_head(name: str, in_features: int, num_labels: int, **kwargs: Any) -> ExitHead:
    cls = HEADS.get(name)
    try:
        return cls(in_features, num_labels, **kwargs)
    except TypeError as err:
        raise ConfigError(f"bad options for head {name!r}: {err}") from None


def classifier_layer(head: nn.Module) -> nn.Module | None:
    """The layer that turns a head's pooled representation into logits: ``feature_layer``
    when the head names one, else its ``classifier`` (or ``fc2`` of the mlp head, ``lm_head``
    of the lm head). Its input is the head's "feature" (self-distillation hints)."""
    for name in ("feature_layer", "classifier", "fc2", "lm_head"):
        layer = getattr(head, name, None)
        if isinstance(layer, nn.Module):
            return layer
    return None

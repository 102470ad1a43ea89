"""Exit heads, registered by name: linear, pooler, mlp, mean, lm, sdn, vit_layer, cascade,
lgvit_local, lgvit_global, native."""

from torch import nn

from . import (  # noqa: F401  (registration side effect)  # noqa: F401  (vision exits: SDN, SL-ViT)  # noqa: F401  (ZTW / IMTA / BoostNet cascades, LGViT)
    cascade,
    lgvit,
    linear,
    lm,  # noqa: F401  (registration side effect)
    mean,
    mlp,
    native,  # noqa: F401  (the model's own classifier as the final exit)
    pooler,
    sdn,
    vit_layer,
)
from .base import (
    HEADS,
    ExitHead,
    build_head,
    classifier_layer,
    heads_for_family,
    register_head,
)
from .cascade import CascadeHead, GeometricEnsemble


def uses_previous_logits(head: nn.Module) -> bool:
    """True when ``head`` takes the previous exit's logits (``previous_logits=``)."""
    return bool(getattr(head, "uses_previous_logits", False))


__all__ = [
    "HEADS",
    "CascadeHead",
    "ExitHead",
    "GeometricEnsemble",
    "build_head",
    "classifier_layer",
    "heads_for_family",
    "register_head",
    "uses_previous_logits",
]

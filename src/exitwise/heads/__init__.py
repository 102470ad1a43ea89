"""Exit heads, registered by name: linear, pooler, mlp, mean, lm, sdn, vit_layer, cascade,
lgvit_local, lgvit_global, native."""

from torch import nn

from . import linear, mean, mlp, pooler  # noqa: F401  (registration side effect)
from . import lm  # noqa: F401  (registration side effect)
from . import sdn, vit_layer  # noqa: F401  (vision exits: SDN, SL-ViT)
from . import cascade, lgvit  # noqa: F401  (ZTW / IMTA / BoostNet cascades, LGViT)
from . import native  # noqa: F401  (the model's own classifier as the final exit)
from .base import HEADS, ExitHead, build_head, heads_for_family, register_head
from .cascade import CascadeHead, GeometricEnsemble


def classifier_layer(head: nn.Module) -> nn.Module | None:
    """The layer that turns a head's pooled representation into logits: ``feature_layer``
    when the head names one, else its ``classifier`` (or ``fc2`` of the mlp head, ``lm_head``
    of the lm head). Its input is the head's "feature" (self-distillation hints)."""
    for name in ("feature_layer", "classifier", "fc2", "lm_head"):
        layer = getattr(head, name, None)
        if isinstance(layer, nn.Module):
            return layer
    return None


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

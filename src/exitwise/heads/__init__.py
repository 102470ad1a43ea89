"""Exit heads, registered by name: linear, pooler, mlp, mean, lm, sdn, vit_layer."""

from . import linear, mean, mlp, pooler  # noqa: F401  (registration side effect)
from . import lm  # noqa: F401  (registration side effect)
from . import sdn, vit_layer  # noqa: F401  (vision exits: SDN, SL-ViT)
from .base import HEADS, ExitHead, build_head, heads_for_family, register_head

__all__ = ["HEADS", "ExitHead", "build_head", "heads_for_family", "register_head"]

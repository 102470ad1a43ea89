"""Exit heads, registered by name: linear, pooler, mlp, mean."""

from . import linear, mean, mlp, pooler  # noqa: F401  (registration side effect)
from .base import HEADS, ExitHead, build_head, register_head

__all__ = ["HEADS", "ExitHead", "build_head", "register_head"]

"""Exit policies, registered by name (see :data:`POLICIES`)."""

from . import (  # noqa: F401  (registration side effect)
    calm_saturation,
    calm_softmax,
    calm_top2,
    confidence,
    entropy,
    never,
    oracle,
    patience,
    patience_confidence,
    static,
)
from .base import POLICIES, ExitPolicy, PolicyState, get_policy, policy_from_dict, register_policy

__all__ = [
    "POLICIES",
    "ExitPolicy",
    "PolicyState",
    "get_policy",
    "policy_from_dict",
    "register_policy",
]

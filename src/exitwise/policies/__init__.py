"""Exit policies, registered by name (see :data:`POLICIES`)."""

from . import (  # noqa: F401  (registration side effect)
    badge,
    budget,
    calm_learned,
    calm_maxprob,
    calm_saturation,
    calm_softmax,
    calm_top2,
    cats,
    confidence,
    dact,
    e2cm,
    elbert,
    entropy,
    fastbert,
    free_bmm,
    lte,
    never,
    oracle,
    patience,
    patience_confidence,
    static,
    voting,
    window,
    ztw,
)
from .base import POLICIES, ExitPolicy, PolicyState, get_policy, policy_from_dict, register_policy
from .budget import BudgetPolicy
from .uee_ucb import UCBExitSelector, depth_costs
from .window import WindowPolicy, normalized_uncertainty
from .ztw import ZTWPolicy, ztw_ensemble

__all__ = [
    "POLICIES",
    "BudgetPolicy",
    "UCBExitSelector",
    "ExitPolicy",
    "PolicyState",
    "WindowPolicy",
    "ZTWPolicy",
    "depth_costs",
    "get_policy",
    "normalized_uncertainty",
    "policy_from_dict",
    "register_policy",
    "ztw_ensemble",
]

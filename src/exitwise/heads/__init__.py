"""Exit heads, registered by name: linear, pooler, mlp, mean, lm, sdn, vit_layer, cascade,
lgvit_local, lgvit_global, native, fastbert; exit scorers (learned per-row scores policies
read): lte."""

from torch import nn

from . import (  # noqa: F401  (importing a head's module registers it)
    cascade,
    cats,
    class_means,
    dact,
    fastbert,
    lgvit,
    linear,
    lm,
    lte,
    mean,
    mlp,
    native,
    past_future,
    pooler,
    sdn,
    smartbert,
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
from .scorer import SCORERS, ExitScorer, build_scorer, feature_width, register_scorer
from .skip_gate import GATES, SkipGate, build_gate, register_gate


def uses_previous_logits(head: nn.Module) -> bool:
    """True when ``head`` takes the previous exit's logits (``previous_logits=``)."""
    return bool(getattr(head, "uses_previous_logits", False))


def uses_past_states(head: nn.Module | type) -> bool:
    """True when ``head`` (or a head class) reads the states earlier exits left (``past=``,
    ``state=``) and leaves its own (``exit_state``); see :mod:`exitwise.heads.past_future`."""
    return bool(getattr(head, "uses_past_states", False))


__all__ = [
    "GATES",
    "HEADS",
    "SCORERS",
    "SkipGate",
    "build_gate",
    "register_gate",
    "ExitScorer",
    "build_scorer",
    "feature_width",
    "register_scorer",
    "CascadeHead",
    "ExitHead",
    "GeometricEnsemble",
    "build_head",
    "classifier_layer",
    "heads_for_family",
    "register_head",
    "uses_past_states",
    "uses_previous_logits",
]

"""Analysis on cached all-exit logits: offline replay of any policy, curves, plots, metrics.

    cache = collect_exit_logits(model, heldout_loader)      # one forward pass
    res = replay(ew.get_policy("entropy", threshold=0.2), cache, model.temperatures)
    curves = curves_for_policies(["confidence", "entropy", "patience"], cache, model.temperatures)
"""

from .cache import ExitLogitsCache, collect_exit_logits, ztw_cache
from .curves import (
    curves_for_policies,
    pareto_front,
    plot_curves,
    policy_curve,
    save_curves_json,
    static_points,
)
from .metrics import (
    correct_matrix,
    exit_histogram,
    overthinking,
    per_exit_accuracy,
    relative_exit_costs,
    summary_table,
)
from .replay import ReplayResult, replay, summarize
from .stream import replay_stream

__all__ = [
    "replay_stream",
    "ztw_cache",
    "ExitLogitsCache",
    "ReplayResult",
    "collect_exit_logits",
    "correct_matrix",
    "curves_for_policies",
    "exit_histogram",
    "overthinking",
    "pareto_front",
    "per_exit_accuracy",
    "plot_curves",
    "policy_curve",
    "relative_exit_costs",
    "replay",
    "save_curves_json",
    "static_points",
    "summarize",
    "summary_table",
]

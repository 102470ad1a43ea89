"""Analysis on cached all-exit logits: offline replay of any policy, curves, plots, metrics.

    cache = collect_exit_logits(model, heldout_loader)      # one forward pass
    res = replay(ew.get_policy("entropy", threshold=0.2), cache, model.temperatures)
    curves = curves_for_policies(["confidence", "entropy", "patience"], cache, model.temperatures)
"""

from .cache import ExitLogitsCache, collect_exit_logits
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
from .protocol_plots import (
    plot_anytime,
    plot_budgeted_batch,
    plot_fixed_cost,
    plot_ood_roc,
    plot_overthinking,
    plot_risk_coverage,
)
from .protocols import (
    anytime,
    auroc,
    budgeted_batch,
    coverage_at_risk,
    fixed_cost_table,
    ood_auroc,
    overthinking_report,
    risk_coverage,
    roc_curve,
    selective_classification,
    window_outcome,
)
from .replay import ReplayResult, replay, summarize, temperature_list

__all__ = [
    "ExitLogitsCache",
    "ReplayResult",
    "anytime",
    "auroc",
    "budgeted_batch",
    "collect_exit_logits",
    "correct_matrix",
    "coverage_at_risk",
    "curves_for_policies",
    "exit_histogram",
    "fixed_cost_table",
    "ood_auroc",
    "overthinking",
    "overthinking_report",
    "pareto_front",
    "per_exit_accuracy",
    "plot_anytime",
    "plot_budgeted_batch",
    "plot_curves",
    "plot_fixed_cost",
    "plot_ood_roc",
    "plot_overthinking",
    "plot_risk_coverage",
    "policy_curve",
    "relative_exit_costs",
    "replay",
    "risk_coverage",
    "roc_curve",
    "save_curves_json",
    "selective_classification",
    "static_points",
    "summarize",
    "summary_table",
    "temperature_list",
    "window_outcome",
]

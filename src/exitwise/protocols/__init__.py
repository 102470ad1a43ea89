"""Evaluation protocols of the early-exit literature on cached all-exit logits: anytime
prediction, budgeted batch classification (MSDNet), fixed-cost tables, risk-coverage,
out-of-distribution AUROC, overthinking; and their plots.

They sit above analysis and calibration (the budgeted protocol fits MSDNet's thresholds).
"""

from .measures import (
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
from .plots import (
    plot_anytime,
    plot_budgeted_batch,
    plot_fixed_cost,
    plot_ood_roc,
    plot_overthinking,
    plot_risk_coverage,
)

__all__ = [
    "anytime",
    "auroc",
    "budgeted_batch",
    "coverage_at_risk",
    "fixed_cost_table",
    "ood_auroc",
    "overthinking_report",
    "plot_anytime",
    "plot_budgeted_batch",
    "plot_fixed_cost",
    "plot_ood_roc",
    "plot_overthinking",
    "plot_risk_coverage",
    "risk_coverage",
    "roc_curve",
    "selective_classification",
    "window_outcome",
]

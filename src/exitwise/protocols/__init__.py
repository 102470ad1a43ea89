"""Evaluation protocols of the early-exit literature on cached all-exit logits: anytime
prediction, budgeted batch classification (MSDNet), fixed-cost tables, risk-coverage,
out-of-distribution AUROC, overthinking; and their plots. The ELUE score (:mod:`.elue`)
compares (FLOPs, performance) points with a baseline curve.

They sit above analysis and calibration (the budgeted protocol fits MSDNet's thresholds).
"""

from .elue import baseline_performance, elue_benchmark, elue_score
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
    "baseline_performance",
    "budgeted_batch",
    "coverage_at_risk",
    "elue_benchmark",
    "elue_score",
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

"""The real early-exit executor and its cost model."""

from .executor import run_early_exit
from .flops import exit_cost_table, full_depth_cost

__all__ = ["exit_cost_table", "full_depth_cost", "run_early_exit"]

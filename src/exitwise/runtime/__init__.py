"""The real early-exit executor, its cost model, and ONNX export as exit segments."""

from .executor import run_early_exit
from .export import ExitSegment, OnnxExitResult, OnnxExitRunner, export_segments, segments_of
from .flops import exit_cost_table, full_depth_cost

__all__ = [
    "ExitSegment",
    "OnnxExitResult",
    "OnnxExitRunner",
    "exit_cost_table",
    "export_segments",
    "full_depth_cost",
    "run_early_exit",
    "segments_of",
]

"""The real early-exit executor, its cost model, ONNX export as exit segments, and the online
runner that picks exits for a stream of unlabeled inputs (UEE-UCB)."""

from .executor import run_early_exit
from .export import ExitSegment, OnnxExitResult, OnnxExitRunner, export_segments, segments_of
from .flops import exit_cost_table, full_depth_cost
from .online import StreamResult, run_stream, stream_order

__all__ = [
    "ExitSegment",
    "OnnxExitResult",
    "OnnxExitRunner",
    "StreamResult",
    "exit_cost_table",
    "export_segments",
    "full_depth_cost",
    "run_early_exit",
    "run_stream",
    "segments_of",
    "stream_order",
]

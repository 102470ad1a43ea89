"""Decoder-only LMs: greedy and lossless self-speculative decoding with HF caches.

    from exitwise.generation import generate
    out = generate(lm, input_ids, attention_mask, strategy="self_speculative",
                   exit_layer=4, draft_len=4, max_new_tokens=32)
"""

from .api import STRATEGIES, generate
from .greedy import greedy_decode
from .outputs import GenerateOutput, GenerationStats
from .sampling import (
    SamplingConfig,
    acceptance_probability,
    residual_distribution,
    speculative_accept,
)
from .self_speculative import self_speculative_decode
from .session import DecodeSession
from .stopping import StopStrings, StreamingSession

__all__ = [
    "STRATEGIES",
    "DecodeSession",
    "GenerateOutput",
    "GenerationStats",
    "SamplingConfig",
    "StopStrings",
    "StreamingSession",
    "acceptance_probability",
    "generate",
    "greedy_decode",
    "residual_distribution",
    "speculative_accept",
    "self_speculative_decode",
]

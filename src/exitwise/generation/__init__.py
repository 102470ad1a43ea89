"""Decoder-only LMs: greedy and lossless self-speculative decoding with HF caches.

    from exitwise.generation import generate
    out = generate(lm, input_ids, attention_mask, strategy="self_speculative",
                   exit_layer=4, draft_len=4, max_new_tokens=32)
"""

from .api import STRATEGIES, generate
from .greedy import greedy_decode
from .outputs import GenerateOutput, GenerationStats
from .self_speculative import self_speculative_decode
from .session import DecodeSession

__all__ = [
    "STRATEGIES",
    "DecodeSession",
    "GenerateOutput",
    "GenerationStats",
    "generate",
    "greedy_decode",
    "self_speculative_decode",
]

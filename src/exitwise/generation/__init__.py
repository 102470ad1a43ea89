"""Decoder-only LMs: greedy, lossless self-speculative and early-exit decoding with HF caches.

    from exitwise.generation import generate
    out = generate(lm, input_ids, attention_mask, strategy="self_speculative",
                   exit_layer=4, draft_len=4, max_new_tokens=32)

Strategies are registered by name (``DECODING_STRATEGIES``), one file each, with their own
options; :class:`GenerationConfig` holds the options they share.
"""

from .api import generate
from .draft_control import DraftLengthController
from .early_exit import EarlyExit
from .greedy import Greedy, greedy_decode
from .layer_skip import LayerSkipDrafter, SkipSearch, search_skip_layers
from .ngram import NGramDrafter, NGramTables
from .outputs import GenerateOutput, GenerationStats
from .sampling import (
    SamplingConfig,
    acceptance_probability,
    residual_distribution,
    speculative_accept,
)
from .self_speculative import self_speculative_decode
from .session import DecodeSession
from .skip_bayes import TimedSkipSearch, bayes_search_skip_layers
from .speculative import ANPD, LayerSkip, SelfSpeculative, Swift, swift_search
from .stopping import StopStrings, StreamingSession
from .swift import SwiftDrafter, SwiftSearch
from .strategies import (
    DECODING_STRATEGIES,
    DecodeInputs,
    DecodingStrategy,
    GenerationConfig,
    get_decoding_strategy,
    register_decoding_strategy,
)
from .token_tree import ChainTree, accept_greedy

__all__ = [
    "ANPD",
    "ChainTree",
    "accept_greedy",
    "DECODING_STRATEGIES",
    "DraftLengthController",
    "NGramDrafter",
    "NGramTables",
    "DecodeInputs",
    "DecodingStrategy",
    "EarlyExit",
    "GenerationConfig",
    "LayerSkip",
    "LayerSkipDrafter",
    "SkipSearch",
    "search_skip_layers",
    "TimedSkipSearch",
    "bayes_search_skip_layers",
    "Greedy",
    "SelfSpeculative",
    "Swift",
    "SwiftDrafter",
    "SwiftSearch",
    "swift_search",
    "get_decoding_strategy",
    "register_decoding_strategy",
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

"""What a decoder block needs besides its input on new tokens (:class:`DecodeContext`), and the
position ids and SDPA masks of a decoding pass, for :class:`~.hf_decoder.HFDecoderBackbone`."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DecodeContext:
    """Everything a block needs besides its input when running on new tokens.

    cache:          an HF ``Cache`` (``DynamicCache``) the blocks append to, or None.
    positions:      (B, q) position ids of the new tokens (RoPE angles / learned positions).
    attention_mask: (B, S + q) 1 for a real cache slot, 0 for left padding and for "holes"
                    (slots of rejected draft tokens that other rows still need); the last q
                    columns are the new tokens.
    slot_positions: (B, S + q) position id of every slot; only needed by sliding-window
                    layers once the sequence is longer than the window (holes make slot
                    distance differ from token distance).
    tree:           None, or (n, n) bool: a token tree's ancestor-or-self matrix over the n
                    slots a speculative step writes, which start at slot ``tree_start``; a
                    new token then attends to the slots before ``tree_start`` and to its own
                    ancestors among the step's slots only (token-tree verification). The
                    slots are in topological order (a parent before its children).
    """

    cache: Any
    positions: torch.Tensor
    attention_mask: torch.Tensor
    slot_positions: torch.Tensor | None = None
    tree: torch.Tensor | None = None
    tree_start: int = 0
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)


@functools.cache
def cache_keyword() -> str:
    """The name under which this transformers version's decoder blocks and mask functions
    take the KV cache: ``cache`` (5.2x) or ``past_key_values`` (earlier 5.x). A block given
    the wrong one would swallow it in ``**kwargs`` and silently attend without the cache."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    return "cache" if "cache" in params else "past_key_values"


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids counting real tokens only, 0 on padding (as HF ``generate`` does)."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def decode_sdpa_mask(attention_mask: torch.Tensor, cached: int, q: int
                      ) -> torch.Tensor | None:
    """The SDPA mask of a decoding pass: q new slots after ``cached`` ones, attention_mask
    (B, cached + q) 1 real / 0 padding or hole. None (SDPA's own causal path) for one new
    slot and no zeros, else (B, 1, q, cached + q) bool, True = attend: key slot j is seen by
    query slot cached + i when j <= cached + i and slot j is real.

    This is what transformers' ``create_causal_mask`` returns for SDPA on such a pass (a
    test compares the two on every family); built here from two tensors because its
    general path costs a few tenths of a millisecond per build on a CPU, which a tiny
    model's step (about a millisecond) would feel, and a drafting step builds several."""
    real = attention_mask.bool()
    if q == 1 and bool(real.all()):
        return None
    slots = torch.arange(cached + q, device=real.device)
    causal = slots[None, :] <= (slots[cached:, None])  # (q, cached + q)
    return (causal[None] & real[:, None, :])[:, None]

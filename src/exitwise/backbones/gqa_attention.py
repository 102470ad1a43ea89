"""Grouped-query attention over several new tokens without copying the cache's keys/values.

A model with fewer key/value heads than query heads (grouped-query attention: Llama 3,
SmolLM2, Qwen, Mistral ...) decodes one token at a time through transformers' SDPA path
without copies: with one query position it folds the query heads onto their key/value head.
A pass of *several* new tokens under a mask -- verifying drafts, a padded prompt -- takes its
other branch instead, ``repeat_kv``: every block copies its whole cached keys and values once
per query head of a group before attending. That copy grows with the context; on SmolLM2
(9 query heads on 3 key/value heads) it is a large share of the attention in a verification
pass. PyTorch's SDPA takes the groups itself (``enable_gqa=True``); transformers leaves that
off whenever a mask is given because CUDA kernels then fall back to a slow path, which does
not hold on a CPU, where the result is also bit for bit the same (a test checks it).

So a pass of several new tokens under a mask on a CPU runs each such block through a
*GQA view*: a shallow copy of the block whose attention module reads a view of the model's
config naming :data:`ATTENTION`, an attention function registered with transformers'
``AttentionInterface`` (its documented way to add one). The view shares every parameter,
buffer and hook with the block; the user's model, its config and transformers' own functions
are untouched. Everything else (one new token, no mask, other devices, models without
groups, eager or other attention back-ends) runs the block itself.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the name the attention function is registered under
ATTENTION = "exitwise_sdpa_gqa"


def gqa_sdpa_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with the key/value groups left to SDPA
    (``enable_gqa``) when several query positions attend under a mask on a CPU.

    query (B, Hq, q, D); key, value (B, Hkv, S, D); attention_mask (B or 1, 1, q, S) bool or
    additive float. Returns ((B, q, Hq, D), None) like transformers' function, which runs
    every other case (and refuses what it refuses, e.g. a soft-cap)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and attention_mask is not None and query.shape[2] > 1
            and query.device.type == "cpu" and isinstance(attention_mask, torch.Tensor)
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and not kwargs.get("output_attentions", False)):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


_registered = False


def register() -> None:
    """Register :func:`gqa_sdpa_attention` as :data:`ATTENTION` (once)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, gqa_sdpa_attention)
        _registered = True


class _ConfigView:
    """A model config with ``_attn_implementation`` read as :data:`ATTENTION`; every other
    attribute is the config's own (read through, never copied)."""

    _attn_implementation = ATTENTION

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a GQA view's config is read-only")


def grouped(block: nn.Module, attn: str) -> bool:
    """Whether ``block``'s attention module ``attn`` has key/value groups and runs
    transformers' SDPA (the case :func:`gqa_view` serves)."""
    module = getattr(block, attn, None)
    config = getattr(module, "config", None)
    return (getattr(module, "num_key_value_groups", 1) > 1
            and getattr(config, "_attn_implementation", None) == "sdpa")


def gqa_view(block: nn.Module, attn: str) -> nn.Module:
    """A shallow copy of ``block`` whose attention child ``attn`` (itself shallow-copied)
    reads a :class:`_ConfigView`: the same parameters, buffers and hooks, attention through
    :func:`gqa_sdpa_attention`. ``block`` must be :func:`grouped`."""
    register()
    module = getattr(block, attn)
    attn_view = copy.copy(module)  # shares __dict__'s values: parameters, buffers, hooks
    attn_view.__dict__["config"] = _ConfigView(module.config)
    out = copy.copy(block)
    out.__dict__["_modules"] = {**block._modules, attn: attn_view}
    return out

"""Choosing the draft vocabulary of an ``lm`` exit head (``draft_vocab=K``).

A draft head that reads out only K of the V token ids (FR-Spec, Zhao et al. 2025: drafting
over a frequency-ranked subset) saves most of the LM-head cost of each draft step; the full
model still verifies over all V, so self-speculative decoding stays lossless. The subset is
the K ids with the largest *expected frequency under the model itself*: the final layer's
next-token probabilities summed over every real position of the tuning sequences. Summing
probabilities rather than counting sampled tokens ranks the whole vocabulary from a few
thousand positions, and it favours exactly the tokens the model is likely to emit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .data import pad_batch
from .exits import exit_and_final_logits


@torch.no_grad()
def expected_token_mass(
    model: Any, seqs: list[list[int]], pad_id: int, batch_size: int = 8,
) -> torch.Tensor:
    """(V,) float64: sum over the real positions of ``seqs`` of the final layer's softmax."""
    if not seqs:
        raise ConfigError("need at least one sequence to choose a draft vocabulary")
    device = model.backbone.lm_head.weight.device
    mass = torch.zeros(model.backbone.vocab_size, dtype=torch.float64)
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s : s + batch_size], pad_id)
        _, final = exit_and_final_logits(model, [], ids.to(device), mask.to(device), grad=False)
        probs = torch.softmax(final.float()[mask.bool().to(device)], -1)  # (N, V)
        mass += probs.sum(0).double().cpu()
    return mass


def rank_tokens(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """(V,) all token ids, by expected frequency under the model, most frequent first."""
    mass = expected_token_mass(model, seqs, pad_id, batch_size)
    return torch.argsort(mass, descending=True, stable=True)


def choose_draft_vocab(
    model: Any, seqs: list[list[int]], size: int, pad_id: int, batch_size: int = 8,
) -> torch.Tensor:
    """(size,) token ids with the largest expected frequency, most frequent first."""
    vocab = model.backbone.vocab_size
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= vocab:
        raise ConfigError(f"draft vocabulary size must be in 1..{vocab}; got {size!r}")
    return rank_tokens(model, seqs, pad_id, batch_size)[:size]


def set_draft_vocabularies(
    model: Any, ks: list[int], seqs: list[list[int]], pad_id: int, batch_size: int = 8,
) -> dict[int, int]:
    """Fill ``vocab_ids`` of every head in ``ks`` built with ``draft_vocab``; one pass of the
    model serves all sizes. Returns {exit index: K} of the heads it set."""
    sized = {
        k: model.heads[k].draft_vocab for k in ks if getattr(model.heads[k], "draft_vocab", None)
    }
    if not sized:
        return {}
    ranked = rank_tokens(model, seqs, pad_id, batch_size)
    for k, size in sized.items():
        model.heads[k].set_draft_vocab(ranked[:size])
    return sized

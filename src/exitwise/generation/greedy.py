"""Plain decoding through the decoder adapter, one token per step with a KV cache.

Greedy by default: the reference every other decoding strategy must reproduce token for token;
it also equals ``model.generate(do_sample=False)`` (the prompts left-padded, EOS and padding
handled per row). With a sampling :class:`~.sampling.SamplingConfig` each token is drawn from
the full model's processed distribution instead (the reference for speculative sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .outputs import GenerateOutput
from .sampling import SamplingConfig
from .session import DecodeSession
from .strategies import (
    DecodeInputs,
    DecodingStrategy,
    register_decoding_strategy,
    session_for,
    stats_for,
)


def plain_step(session: DecodeSession, sampler: SamplingConfig, split: int = 0,
               on_split: Callable[[], None] | None = None) -> None:
    """One token per active row through every block (the step of plain decoding, and of a
    speculative step with nothing to draft). ``split``/``on_split``: blocks [0, split) run
    first, then ``on_split()`` is called (a speculative decoder's timer), then the rest.
    Leaves the last block's output at each row's position in ``session.final_hidden``."""
    bb, stats = session.backbone, session.stats
    a = session.active
    running = sum(session.running())
    ctx = session.context(0, 1)
    hidden = bb.embed(session.pending[:, None], ctx.positions)
    if split:
        hidden = bb.run_layers(hidden, 0, split, ctx)
    if on_split is not None:
        on_split()
    hidden = bb.run_layers(hidden, split, bb.num_layers, ctx)
    nxt = sampler.choose(bb.lm_logits(bb.final_norm(hidden[:, -1])))
    session.final_hidden = hidden[:, -1]
    ones = torch.ones(a, 1, dtype=torch.long, device=nxt.device)
    session.commit(session.pending[:, None], ones, ones[:, 0], nxt)
    stats.iterations += 1
    stats.layer_applications += running * bb.num_layers
    stats.sequential_layers += bb.num_layers
    session.emit([[t] for t in nxt.tolist()])
    session.drop_finished()


@torch.inference_mode()
def greedy_decode(session: DecodeSession, sampler: SamplingConfig | None = None) -> torch.Tensor:
    """Run ``session`` to the end, greedily or with ``sampler``; return the sequences (B, T + N)."""
    sampler = sampler or SamplingConfig()
    first = sampler.choose(session.prefill())
    session.pending = first
    session.emit([[t] for t in first.tolist()])
    session.drop_finished()
    while session.unfinished:
        plain_step(session, sampler)
    return session.sequences()


@register_decoding_strategy("greedy")
@dataclass
class Greedy(DecodingStrategy):
    """One token per full forward pass (sampling with ``do_sample``); no options."""

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        stats = stats_for(inputs, self.registered_name)
        sequences = greedy_decode(session_for(inputs, stats), inputs.sampler)
        return GenerateOutput(sequences=sequences, stats=stats)

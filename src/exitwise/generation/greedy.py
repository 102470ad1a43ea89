"""Plain greedy decoding through the decoder adapter, one token per step with a KV cache.

The reference every other decoding strategy must reproduce token for token; it also equals
``model.generate(do_sample=False)`` (the prompts left-padded, EOS and padding handled per row).
"""

from __future__ import annotations

import torch

from .session import DecodeSession


@torch.inference_mode()
def greedy_decode(session: DecodeSession) -> torch.Tensor:
    """Run ``session`` to the end greedily; return the sequences (B, T + N)."""
    bb = session.backbone
    stats = session.stats
    first = session.prefill().argmax(-1)
    session.pending = first
    session.emit([[t] for t in first.tolist()])
    session.drop_finished()
    while session.unfinished:
        a = session.active
        running = sum(session.running())
        ctx = session.context(0, 1)
        hidden = bb.embed(session.pending[:, None], ctx.positions)
        hidden = bb.run_layers(hidden, 0, bb.num_layers, ctx)
        nxt = bb.lm_logits(bb.final_norm(hidden[:, -1])).argmax(-1)
        ones = torch.ones(a, 1, dtype=torch.long, device=nxt.device)
        session.commit(session.pending[:, None], ones, ones[:, 0], nxt)
        stats.iterations += 1
        stats.layer_applications += running * bb.num_layers
        stats.sequential_layers += bb.num_layers
        session.emit([[t] for t in nxt.tolist()])
        session.drop_finished()
    return session.sequences()

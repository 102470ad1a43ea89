"""Lossless self-speculative greedy decoding (LayerSkip-style draft with the early layers).

One step, for every active row at once (E = exit layer, L = layers, k = draft length):

1. **Draft.** Feed the pending token d0 through blocks [0, E) and the exit head: draft x1;
   feed x1: draft x2; ... up to xk, then feed xk through [0, E) once more (no head). Each
   pass writes its keys/values for blocks < E into the shared cache, and the layer-E hidden
   states of d0, x1..xk are kept.
2. **Verify.** Run only blocks [E, L) on those k+1 layer-E states (blocks < E are never
   recomputed), writing their keys/values; the final norm + LM head give the full model's
   choice y0..yk after d0, x1..xk.
3. **Accept** per row the longest prefix with x(i+1) == y(i) (n tokens) plus the full model's
   own next token y(n): n + 1 tokens, exactly what greedy decoding would have emitted.
4. **Roll back.** All rows share one cache: cut the k - max(n) slots no row needs; a row that
   accepted fewer than the best row keeps *holes* (mask zeros) in the slots of its rejected
   drafts, and its positions advance by its own n + 1 so RoPE stays right. y(n) is the next
   pending token.

Because every emitted token is the full model's argmax given the real tokens before it, the
output equals plain greedy decoding token for token (to float round-off in near ties).
"""

from __future__ import annotations

import torch

from ..heads.lm import LMHead
from .session import DecodeSession


@torch.inference_mode()
def self_speculative_decode(
    session: DecodeSession,
    head: LMHead,
    exit_layer: int,
    draft_len: int,
    temperature: float = 1.0,
    draft_threshold: float | None = None,
) -> torch.Tensor:
    """Run ``session`` to the end drafting with ``head`` after ``exit_layer`` blocks.

    draft_threshold: stop drafting early once every active row's draft has a top-1
        probability (softmax of logits / temperature) below this value.
    Returns the sequences (B, T + N).
    """
    bb = session.backbone
    stats = session.stats
    num_layers, e = bb.num_layers, exit_layer

    def fill_head_cache(hidden, ctx):  # a block adapter attends over the prompt too
        head.token_logits(hidden, ctx)

    first = session.prefill(split=e, on_split=fill_head_cache if head.uses_cache else None)
    first = first.argmax(-1)
    session.pending = first
    session.emit([[t] for t in first.tolist()])
    session.drop_finished()

    while session.unfinished:
        a = session.active
        running = session.running()
        device = session.pending.device
        # Drafting past what any row may still emit is waste: cap k by the largest budget.
        k = max(0, min(draft_len, int(session.remaining().max()) - 1))
        tokens = session.pending
        fed = [tokens]
        states: list[torch.Tensor] = []
        drafts: list[torch.Tensor] = []
        j = 0
        while True:
            ctx = session.context(j, 1)
            hidden = bb.run_layers(bb.embed(tokens[:, None], ctx.positions), 0, e, ctx)
            states.append(hidden)
            if j < k or head.uses_cache:  # keep a block adapter's cache aligned with blocks < E
                logits = head.token_logits(hidden, ctx)[:, -1]
                stats.head_applications += sum(running)
            if j == k:
                break
            tokens = logits.argmax(-1)
            drafts.append(tokens)
            fed.append(tokens)
            j += 1
            if draft_threshold is not None and j < k:
                conf = torch.softmax(logits.float() / temperature, -1).amax(-1)
                if bool((conf < draft_threshold).all()):
                    k = j  # one last pass below feeds x_j through blocks < E

        q = k + 1
        ctx = session.context(0, q)
        hidden = bb.run_layers(torch.cat(states, 1), e, num_layers, ctx)
        target = bb.lm_logits(bb.final_norm(hidden)).argmax(-1)  # (A, k+1)
        if k:
            drafted = torch.stack(drafts, 1)  # (A, k)
            accepted = (drafted == target[:, :k]).long().cumprod(1).sum(1)
        else:
            drafted = target[:, :0]
            accepted = torch.zeros(a, dtype=torch.long, device=device)
        best = int(accepted.max())
        if k > best:
            session.cache.crop(-(k - best))  # slots no row kept
        valid = torch.arange(best + 1, device=device)[None, :] <= accepted[:, None]
        nxt = target.gather(1, accepted[:, None])[:, 0]
        session.commit(torch.stack(fed, 1)[:, : best + 1], valid, accepted + 1, nxt)

        stats.iterations += 1
        stats.layer_applications += sum(running) * q * num_layers
        stats.sequential_layers += q * e + (num_layers - e)
        rows = session.rows.tolist()
        n_list = accepted.tolist()
        for r, n, live in zip(rows, n_list, running):
            if live:
                stats.drafted[r] += k
                stats.accepted[r] += n
        session.emit(
            [drafted[i, :n].tolist() + [t] for i, (n, t) in enumerate(zip(n_list, nxt.tolist()))]
        )
        session.drop_finished()
    return session.sequences()

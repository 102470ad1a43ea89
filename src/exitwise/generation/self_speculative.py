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

**Per-row draft stop** (``draft_threshold``, Kangaroo's second early exit; Liu et al. 2024,
reference ``evaluation/inference_kangaroo.py``, ``kangaroo_forward``): a row stops drafting once
the top-1 probability of its latest draft x_j (softmax of the exit logits / temperature) falls
below the threshold; x_j is kept (like the reference, which drafts the unsure token and then
breaks), so that row's draft length is k_r = j. Rows that stopped wait while the others go on
(their lanes keep computing in the batched call, but what they draft past k_r is ignored); the
step's k is the longest row's, and drafting ends once every running row stopped or k tokens
were drafted. A row's k_r is also capped by its own budget (tokens it may still emit, minus the
verified one), so a row drafts in a batch exactly what it drafts alone. Verification caps each
row's acceptance at its own k_r, so its next token is the full model's choice after at most k_r
drafts: ragged acceptance, handled by the holes of step 4 as before, and the output stays
lossless. With sampling, a row whose k_r drafts were all kept draws its next token from
p_{k_r}, as speculative sampling with k_r drafts does. The reference decodes one sequence
(batch 1), where the per-row rule is its rule.

**Sampling** (``sampler.do_sample``): speculative rejection sampling instead of step 3. Drafts
are drawn from the exit head's processed distribution q (its logits divided by the exit's
calibration ``temperature``, then the sampler's temperature / top-k / top-p); draft x(i+1) is
kept with probability min(1, p_i(x(i+1)) / q_i(x(i+1))), p_i the full model's processed
distribution; at the first rejection the next token is drawn from norm(max(0, p_n - q_n)),
and after k kept drafts from p_k (see :mod:`.sampling`). Every emitted token then follows the
processed full-model distribution exactly, as plain sampling would; rows stay ragged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbones.hf_decoder import HFDecoderBackbone
from ..errors import ConfigError
from ..heads.lm import LMHead
from .outputs import GenerateOutput
from .sampling import SamplingConfig, draw, speculative_accept
from .session import DecodeSession
from .strategies import (
    DecodeInputs,
    DecodingStrategy,
    register_decoding_strategy,
    session_for,
    stats_for,
)


@torch.inference_mode()
def self_speculative_decode(
    session: DecodeSession,
    head: LMHead,
    exit_layer: int,
    draft_len: int,
    temperature: float = 1.0,
    draft_threshold: float | None = None,
    sampler: SamplingConfig | None = None,
) -> torch.Tensor:
    """Run ``session`` to the end drafting with ``head`` after ``exit_layer`` blocks.

    temperature: the exit head's calibration temperature (its logits are divided by it).
    draft_threshold: a row stops drafting after its first draft whose top-1 probability
        (softmax of logits / temperature) is below this value (per row; see the module
        docstring).
    sampler: None or greedy -> lossless greedy; sampling -> speculative rejection sampling.
    Returns the sequences (B, T + N).
    """
    sampler = sampler or SamplingConfig()
    sampling = sampler.do_sample
    bb = session.backbone
    stats = session.stats
    num_layers, e = bb.num_layers, exit_layer

    def fill_head_cache(hidden, ctx):  # a block adapter attends over the prompt too
        head.token_logits(hidden, ctx)

    first = session.prefill(split=e, on_split=fill_head_cache if head.uses_cache else None)
    first = sampler.choose(first)
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
        draft_probs: list[torch.Tensor] = []  # q_j (A, V), sampling only
        live = torch.tensor(running, dtype=torch.bool, device=device)
        # Each row's k_r: at most its own budget (what it may still emit) minus the verified
        # token, then shortened by the draft threshold.
        row_len = (session.remaining().to(device) - 1).clamp(min=0, max=k)
        drafting = live & (row_len > 0)  # rows still drafting
        j = 0
        while True:
            ctx = session.context(j, 1)
            hidden = bb.run_layers(bb.embed(tokens[:, None], ctx.positions), 0, e, ctx)
            states.append(hidden)
            if j < k or head.uses_cache:  # keep a block adapter's cache aligned with blocks < E
                # (A, K) over the head's draft vocabulary (K = V without one)
                logits = head.draft_logits(hidden, ctx)[:, -1]
                stats.head_applications += sum(running)
            if j == k:
                break
            if sampling:
                q_j = sampler.probs(head.expand_logits(logits).float() / temperature)
                tokens = draw(q_j, sampler.generator)
                draft_probs.append(q_j)
            else:
                tokens = head.compact_argmax(logits)
            drafts.append(tokens)
            fed.append(tokens)
            j += 1
            if draft_threshold is not None:
                conf = torch.softmax(logits.float() / temperature, -1).amax(-1)
                stop = drafting & (conf < draft_threshold)
                row_len = torch.where(stop, torch.full_like(row_len, j), row_len)
            drafting = drafting & (j < row_len)
            if j < k and not bool(drafting.any()):
                k = j  # one last pass below feeds x_j through blocks < E

        q = k + 1
        ctx = session.context(0, q)
        hidden = bb.run_layers(torch.cat(states, 1), e, num_layers, ctx)
        target_logits = bb.lm_logits(bb.final_norm(hidden))  # (A, k+1, V)
        drafted = torch.stack(drafts, 1) if k else session.pending[:, None][:, :0]  # (A, k)
        if sampling:
            p = sampler.probs(target_logits)
            q_all = torch.stack(draft_probs, 1) if k else p[:, :0]
            accepted, nxt = speculative_accept(drafted, q_all, p, sampler.generator)
            # A row that kept all its own k_r < k drafts continues from p_{k_r} (its later
            # drafts were never proposed); the draws before k_r are unaffected.
            cut = (accepted >= row_len) & (row_len < k)
            if bool(cut.any()):
                rows_cut = cut.nonzero()[:, 0]
                p_cut = p[rows_cut, row_len[rows_cut]]
                nxt = nxt.clone()
                nxt[rows_cut] = draw(p_cut, sampler.generator)
            accepted = torch.minimum(accepted, row_len)
        else:
            target = target_logits.argmax(-1)  # (A, k+1)
            if k:
                accepted = (drafted == target[:, :k]).long().cumprod(1).sum(1)
                accepted = torch.minimum(accepted, row_len)  # a row's own draft length
            else:
                accepted = torch.zeros(a, dtype=torch.long, device=device)
            nxt = target.gather(1, accepted[:, None])[:, 0]
        best = int(accepted.max())
        if k > best:
            session.cache.crop(-(k - best))  # slots no row kept
        valid = torch.arange(best + 1, device=device)[None, :] <= accepted[:, None]
        session.commit(torch.stack(fed, 1)[:, : best + 1], valid, accepted + 1, nxt)

        stats.iterations += 1
        stats.layer_applications += sum(running) * q * num_layers
        stats.sequential_layers += q * e + (num_layers - e)
        rows = session.rows.tolist()
        n_list = accepted.tolist()
        for r, n, k_r, alive in zip(rows, n_list, row_len.tolist(), running):
            if alive:
                stats.drafted[r] += k_r
                stats.accepted[r] += n
        session.emit(
            [drafted[i, :n].tolist() + [t] for i, (n, t) in enumerate(zip(n_list, nxt.tolist()))]
        )
        session.drop_finished()
    return session.sequences()


def draft_head(model: Any, backbone: HFDecoderBackbone, exit_layer: int) -> tuple[LMHead, float]:
    """(the draft head at ``exit_layer``, its calibration temperature): a MultiExitModel's
    trained ``lm`` exit there, or for a plain LM the shared final norm + LM head."""
    if model is backbone or not hasattr(model, "heads"):
        shared = LMHead(backbone.hidden_size, backbone.vocab_size, backbone=backbone)
        return shared.eval(), 1.0
    if exit_layer not in model.exit_layers:
        raise ConfigError(
            f"this model has no exit at layer {exit_layer}; its exits: {model.exit_layers}")
    k = model.exit_layers.index(exit_layer)
    head = model.heads[k]
    if not isinstance(head, LMHead):
        raise ConfigError(
            f"self-speculative drafting needs an 'lm' exit head; exit {exit_layer} has "
            f"{type(head).registered_name!r}")
    return head, float(model.temperatures[k])


@register_decoding_strategy("self_speculative")
@dataclass
class SelfSpeculative(DecodingStrategy):
    """Draft with the first ``exit_layer`` blocks and an exit head, verify with the rest:
    the tokens of greedy decoding (or, sampling, its distribution), fewer full passes.

    exit_layer: depth 1..L-1 of the draft exit (required). draft_len: draft tokens per step
    (>= 1). draft_threshold: stop a row's draft once its top-1 probability is below this.
    """

    exit_layer: int | None = None
    draft_len: int = 4
    draft_threshold: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or (
                self.draft_len < 1):
            raise ConfigError(f"draft_len must be an int >= 1; got {self.draft_len!r}")
        if self.draft_threshold is not None and not 0.0 <= float(self.draft_threshold) <= 1.0:
            raise ConfigError(f"draft_threshold must be a probability in [0, 1]; "
                              f"got {self.draft_threshold!r}")

    def validate(self, backbone: HFDecoderBackbone, model: Any) -> None:
        last = backbone.num_layers - 1
        e = self.exit_layer
        if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= last:
            raise ConfigError(
                f"exit_layer must be a depth in 1..{last} (blocks run by the draft; this model "
                f"has {backbone.num_layers} layers); got {e!r}")

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        assert self.exit_layer is not None
        head, temperature = draft_head(inputs.model, inputs.backbone, self.exit_layer)
        stats = stats_for(inputs, self.registered_name, exit_layer=self.exit_layer,
                          draft_len=self.draft_len)
        sequences = self_speculative_decode(
            session_for(inputs, stats), head, self.exit_layer, self.draft_len,
            temperature=temperature, draft_threshold=self.draft_threshold,
            sampler=inputs.sampler)
        return GenerateOutput(sequences=sequences, stats=stats)

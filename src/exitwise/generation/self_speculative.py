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

import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..backbones.hf_decoder import HFDecoderBackbone
from ..errors import ConfigError
from ..heads.lm import LMHead
from .draft_control import DraftLengthController
from .ngram import NGramDrafter
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
    head: LMHead | None,
    exit_layer: int,
    draft_len: int,
    temperature: float = 1.0,
    draft_threshold: float | None = None,
    sampler: SamplingConfig | None = None,
    ngram: NGramDrafter | None = None,
    ngram_len: int | None = None,
    controller: DraftLengthController | None = None,
) -> torch.Tensor:
    """Run ``session`` to the end drafting with ``head`` after ``exit_layer`` blocks and/or
    with n-gram lookups.

    head: the exit head (None: no exit drafts; then ``exit_layer`` must be 0 and ``ngram``
        given: ANPD alone, verification runs every block).
    temperature: the exit head's calibration temperature (its logits are divided by it).
    draft_threshold: a row stops drafting after its first draft whose top-1 probability
        (softmax of logits / temperature) is below this value (per row; see the module
        docstring).
    sampler: None or greedy -> lossless greedy; sampling -> speculative rejection sampling.
    ngram: a row whose n-gram tables predict a continuation drafts it (up to ``ngram_len``
        tokens, default ``draft_len``) instead of the exit head's tokens (:mod:`.ngram`).
    controller: chooses each step's draft lengths from measured costs and acceptance
        (``draft_len`` and ``ngram_len`` are then ignored; :mod:`.draft_control`).
    Returns the sequences (B, T + N).
    """
    sampler = sampler or SamplingConfig()
    sampling = sampler.do_sample
    bb = session.backbone
    stats = session.stats
    num_layers, e = bb.num_layers, exit_layer
    if head is None and (e != 0 or ngram is None):
        raise ConfigError("drafting without an exit head needs exit_layer 0 and n-gram drafts")
    ngram_len = draft_len if ngram_len is None else ngram_len

    def fill_head_cache(hidden, ctx):  # a block adapter attends over the prompt too
        head.token_logits(hidden, ctx)

    uses_cache = head is not None and head.uses_cache
    if ngram is not None:  # tables from each prompt's real tokens, keyed by original row
        ngram.start([ids[m.bool()].tolist() for ids, m in zip(session.prompt, session.mask)])
    first = session.prefill(split=e if head is not None else None,
                            on_split=fill_head_cache if uses_cache else None)
    first = sampler.choose(first)
    session.pending = first
    session.emit([[t] for t in first.tolist()])
    session.drop_finished()

    while session.unfinished:
        a = session.active
        running = session.running()
        device = session.pending.device
        live = torch.tensor(running, dtype=torch.bool, device=device)
        # Each row's k_r: at most its own budget (what it may still emit) minus the verified
        # token; then the exit's (or the controller's) length or its n-gram draft's length.
        budget = (session.remaining().to(device) - 1).clamp(min=0)
        if controller is not None:
            controller.begin_step()
        if head is None:
            k_exit = 0
        elif controller is not None:
            k_exit = controller.choose(a, "exit", "per_token")
        else:
            k_exit = draft_len
        proposals: list[list[int]] = [[] for _ in range(a)]
        if ngram is not None:
            cap = (controller.choose(a, "ngram", "one" if e else "none")
                   if controller is not None else ngram_len)
            if controller is not None and head is not None and not controller.prefers(
                    "ngram", "exit"):
                cap = 0  # the exit's drafts promise more tokens per second now
            for i, r in enumerate(session.rows.tolist()):
                if running[i] and cap:
                    proposals[i] = ngram.propose(r, session.generated[r],
                                                 min(cap, int(budget[i])))
        from_ngram = torch.tensor([bool(p) for p in proposals], dtype=torch.bool, device=device)
        row_len = torch.where(from_ngram,
                              torch.tensor([len(p) for p in proposals], device=device),
                              budget.clamp(max=k_exit))
        row_len = torch.where(live, row_len, torch.zeros_like(row_len))
        k = int(row_len.max()) if a else 0
        timer = _StepTimer(controller, device)
        if k == 0 and not uses_cache:  # nothing to draft: a plain decoding step, as lean
            _plain_step(session, e, sampler, timer, running)
            continue

        if head is None or not bool((live & ~from_ngram & (row_len > 0)).any()):
            # Every draft is known up front: one pass over the k + 1 tokens below the exit.
            fed_all = _padded(session.pending, proposals, k)
            ctx = session.context(0, k + 1)
            hidden = bb.embed(fed_all, ctx.positions)
            if e:
                hidden = bb.run_layers(hidden, 0, e, ctx)
                if uses_cache:
                    head.draft_logits(hidden, ctx)
                    stats.head_applications += sum(running) * (k + 1)
            states, fed = hidden, list(fed_all.unbind(1))
            drafts, draft_probs = fed[1:], []
            if sampling and k:
                v = bb.vocab_size
                draft_probs = [torch.nn.functional.one_hot(t, v).float() for t in drafts]
            passes = 1 if e else 0
            sequential = e
        else:
            states_l, fed, drafts, draft_probs, k, row_len, passes = _draft_sequentially(
                session, head, e, k, row_len, live, proposals, from_ngram, temperature,
                draft_threshold, sampler, stats)
            states = torch.cat(states_l, 1)
            sequential = passes * e
        timer.drafted()

        q = k + 1
        ctx = session.context(0, q)
        hidden = bb.run_layers(states, e, num_layers, ctx)
        target_logits = bb.lm_logits(bb.final_norm(hidden))  # (A, k+1, V)
        last_final = hidden
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
        timer.verified(a, q, passes)
        if controller is not None:
            for source, rows_of in (("exit", ~from_ngram), ("ngram", from_ngram)):
                sel = rows_of & live & (row_len > 0)
                if bool(sel.any()):
                    controller.record_acceptance(source, accepted[sel].tolist(),
                                                 row_len[sel].tolist())
        # the final state at the position that chose each row's next token (conditioned exits)
        session.final_hidden = last_final[torch.arange(a, device=device), accepted]
        best = int(accepted.max())
        if k > best:
            session.cache.crop(-(k - best))  # slots no row kept
        valid = torch.arange(best + 1, device=device)[None, :] <= accepted[:, None]
        session.commit(torch.stack(fed, 1)[:, : best + 1], valid, accepted + 1, nxt)

        stats.iterations += 1
        stats.step_draft_lengths.append(k)
        stats.layer_applications += sum(running) * q * num_layers
        stats.sequential_layers += sequential + (num_layers - e)
        rows = session.rows.tolist()
        n_list = accepted.tolist()
        for r, n, k_r, alive, by_ngram in zip(rows, n_list, row_len.tolist(), running,
                                               from_ngram.tolist()):
            if alive:
                stats.drafted[r] += k_r
                stats.accepted[r] += n
                if by_ngram:
                    stats.ngram_drafted += k_r
                    stats.ngram_accepted += n
        session.emit(
            [drafted[i, :n].tolist() + [t] for i, (n, t) in enumerate(zip(n_list, nxt.tolist()))]
        )
        session.drop_finished()
    return session.sequences()


def _plain_step(session: DecodeSession, e: int, sampler: SamplingConfig, timer: "_StepTimer",
                running: list[bool]) -> None:
    """One token per row through every block, as plain decoding (the step with k = 0): the
    blocks below the exit timed as the draft pass and the rest as verifying one position, so
    the controller sees the same costs as on the drafting path."""
    bb, stats = session.backbone, session.stats
    a = session.active
    ctx = session.context(0, 1)
    hidden = bb.embed(session.pending[:, None], ctx.positions)
    if e:
        hidden = bb.run_layers(hidden, 0, e, ctx)
    timer.drafted()
    hidden = bb.run_layers(hidden, e, bb.num_layers, ctx)
    nxt = sampler.choose(bb.lm_logits(bb.final_norm(hidden[:, -1])))
    timer.verified(a, 1, 1 if e else 0)
    session.final_hidden = hidden[:, -1]
    ones = torch.ones(a, 1, dtype=torch.long, device=nxt.device)
    session.commit(session.pending[:, None], ones, ones[:, 0], nxt)
    stats.iterations += 1
    stats.step_draft_lengths.append(0)
    stats.layer_applications += sum(running) * bb.num_layers
    stats.sequential_layers += bb.num_layers
    session.emit([[t] for t in nxt.tolist()])
    session.drop_finished()


def _padded(pending: torch.Tensor, proposals: list[list[int]], k: int) -> torch.Tensor:
    """(A, k + 1): each row's pending token, then its proposal padded with its pending token
    (padding slots are never kept: the row's k_r stops before them)."""
    rows = [[t] + p + [t] * (k - len(p)) for t, p in zip(pending.tolist(), proposals)]
    return torch.tensor(rows, dtype=torch.long, device=pending.device)


def _draft_sequentially(session, head, e, k, row_len, live, proposals, from_ngram, temperature,
                        draft_threshold, sampler, stats):
    """The exit head's drafts, one pass of blocks [0, E) per position (see the module
    docstring); a row with an n-gram proposal feeds that instead of the head's token.
    Returns (states per position (A, 1, H), fed tokens, drafts, draft probs (sampling), k,
    row_len, passes)."""
    bb = session.backbone
    sampling = sampler.do_sample
    running = live.tolist()
    tokens = session.pending
    fed = [tokens]
    states: list[torch.Tensor] = []
    drafts: list[torch.Tensor] = []
    draft_probs: list[torch.Tensor] = []  # q_j (A, V), sampling only
    ngram_rows = from_ngram.nonzero()[:, 0].tolist()
    drafting = live & (row_len > 0)  # rows still drafting
    exit_rows = ~from_ngram
    j = 0
    while True:
        ctx = session.context(j, 1)
        hidden = bb.run_layers(bb.embed(tokens[:, None], ctx.positions), 0, e, ctx)
        states.append(hidden)
        if j < k or head.uses_cache:  # keep a block adapter's cache aligned with blocks < E
            # (A, K) over the head's draft vocabulary (K = V without one); a conditioned exit
            # reads the final state that chose the pending token (first draft only)
            cond = session.final_hidden[:, None] if (
                j == 0 and head.conditioned and session.final_hidden is not None) else None
            logits = head.draft_logits(hidden, ctx, cond)[:, -1]
            stats.head_applications += sum(running)
        if j == k:
            break
        if sampling:
            q_j = sampler.probs(head.expand_logits(logits).float() / temperature)
            tokens = draw(q_j, sampler.generator)
        else:
            tokens = head.compact_argmax(logits)
        here = [i for i in ngram_rows if j < len(proposals[i])]
        if here:  # n-gram rows feed their own proposal (a point mass as q)
            tokens = tokens.clone()
            if sampling:
                q_j = q_j.clone()
            for i in here:
                tokens[i] = proposals[i][j]
                if sampling:
                    q_j[i] = 0.0
                    q_j[i, proposals[i][j]] = 1.0
        if sampling:
            draft_probs.append(q_j)
        drafts.append(tokens)
        fed.append(tokens)
        j += 1
        if draft_threshold is not None:
            conf = torch.softmax(logits.float() / temperature, -1).amax(-1)
            stop = drafting & exit_rows & (conf < draft_threshold)
            row_len = torch.where(stop, torch.full_like(row_len, j), row_len)
        drafting = drafting & (j < row_len)
        if j < k and not bool(drafting.any()):
            k = j  # one last pass below feeds x_j through blocks < E
    return states, fed, drafts, draft_probs, k, row_len, j + 1


class _StepTimer:
    """Wall-clock of a step's draft and verify phases, handed to the controller (if any)."""

    def __init__(self, controller: DraftLengthController | None, device: torch.device) -> None:
        self.controller = controller
        self.cuda = device.type == "cuda"
        self.t0 = self._now() if controller is not None else 0.0
        self.t1 = self.t0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def drafted(self) -> None:
        if self.controller is not None:
            self.t1 = self._now()

    def verified(self, rows: int, q: int, passes: int) -> None:
        if self.controller is None:
            return
        t2 = self._now()
        draft = self.t1 - self.t0 if passes else None  # no pass: nothing ran before verifying
        self.controller.record_costs(rows, q, t2 - self.t1, draft, passes)


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


def _check_draft_len(value: Any, name: str = "draft_len") -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1 or 'auto'; got {value!r}")


# model (the HF module) -> {(what drafts, machine settings): controller}: what a controller
# measured (step costs per batch size, acceptance) carries over to the next generate call on
# the same model, so the calibration happens at first use, not at every call
_CONTROLLERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _controller(draft_len: int | str, max_draft_len: int, inputs: DecodeInputs,
                key: tuple) -> DraftLengthController | None:
    """The model's automatic draft-length controller for ``key`` (None unless "auto")."""
    if draft_len != "auto":
        return None
    per_model = _CONTROLLERS.setdefault(inputs.backbone.model, {})
    full = (*key, max_draft_len, torch.get_num_threads(), inputs.kernels,
            str(inputs.input_ids.device))
    if full not in per_model:
        per_model[full] = DraftLengthController(max_len=max_draft_len)
    return per_model[full]


def _shallowest_lm_exit(model: Any) -> int | None:
    """Depth of a multi-exit model's shallowest ``lm`` exit (not the final layer), or None."""
    heads = getattr(model, "heads", None)
    if heads is None:
        return None
    for depth, head in zip(model.exit_layers[:-1], list(heads)[:-1]):
        if isinstance(head, LMHead):
            return int(depth)
    return None


@register_decoding_strategy("self_speculative")
@dataclass
class SelfSpeculative(DecodingStrategy):
    """Draft with the first ``exit_layer`` blocks and an exit head, verify with the rest:
    the tokens of greedy decoding (or, sampling, its distribution), fewer full passes.

    exit_layer: depth 1..L-1 of the draft exit. None: a multi-exit model's shallowest ``lm``
    exit, or for a plain LM the drafter shipped for exactly its weights
    (:mod:`exitwise.generation.shipped`; its measured options fill every option left None).
    draft_len: draft tokens per step (>= 1; default 4), or "auto": chosen per step from the
    measured costs and acceptance, 0 (plain decoding) when speculation does not pay, at most
    ``max_draft_len`` (:mod:`.draft_control`). draft_threshold: stop a row's draft once its
    top-1 probability is below this. ngram: also draft from the text's own n-grams up to
    this order (ANPD, :mod:`.ngram`; None or 0: off): a row whose tables predict a
    continuation drafts it instead of the exit's tokens, up to ``ngram_len`` tokens (default:
    ``draft_len``).
    """

    exit_layer: int | None = None
    draft_len: int | str | None = None
    draft_threshold: float | None = None
    ngram: int | None = None
    ngram_len: int | None = None
    max_draft_len: int = 8

    def __post_init__(self) -> None:
        if self.draft_len is not None:
            _check_draft_len(self.draft_len)
        _check_draft_len(self.max_draft_len, "max_draft_len")
        if self.max_draft_len == "auto":
            raise ConfigError("max_draft_len must be an int >= 1")
        if self.ngram_len is not None:
            _check_draft_len(self.ngram_len, "ngram_len")
            if self.ngram_len == "auto":
                raise ConfigError("ngram_len must be an int >= 1 (draft_len='auto' sets both)")
        if self.ngram:
            NGramDrafter(self.ngram)  # validates the order
        if self.draft_threshold is not None and not 0.0 <= float(self.draft_threshold) <= 1.0:
            raise ConfigError(f"draft_threshold must be a probability in [0, 1]; "
                              f"got {self.draft_threshold!r}")

    def validate(self, backbone: HFDecoderBackbone, model: Any) -> None:
        last = backbone.num_layers - 1
        e, drafter_model, shipped = self.exit_layer, model, {}
        if e is None:
            e = _shallowest_lm_exit(model)
        if e is None and not hasattr(model, "heads"):
            from .shipped import find_drafter, with_shipped_drafter

            found = find_drafter(backbone)
            if found is not None:
                e, shipped = found.exit_layer, found.options
                drafter_model = with_shipped_drafter(backbone, found)
        if e is None:
            raise ConfigError(
                "exit_layer is required: this model has no tuned 'lm' exit and no drafter is "
                "shipped for its weights (tune one with `exitwise tune-lm` or "
                "ew.tune_exits, or pass exit_layer to draft through the shared LM head)")
        if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= last:
            raise ConfigError(
                f"exit_layer must be a depth in 1..{last} (blocks run by the draft; this model "
                f"has {backbone.num_layers} layers); got {e!r}")
        # what decode() runs: the options given, else the shipped drafter's, else defaults
        self._resolved = (drafter_model, e, shipped)

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        model, exit_layer, shipped = getattr(
            self, "_resolved", (inputs.model, self.exit_layer, {}))
        draft_len = self.draft_len if self.draft_len is not None else shipped.get(
            "draft_len", 4)
        ngram = self.ngram if self.ngram is not None else shipped.get("ngram")
        head, temperature = draft_head(model, inputs.backbone, exit_layer)
        fixed = draft_len if isinstance(draft_len, int) else self.max_draft_len
        stats = stats_for(inputs, self.registered_name, exit_layer=exit_layer, draft_len=fixed)
        sequences = self_speculative_decode(
            session_for(inputs, stats), head, exit_layer, fixed,
            temperature=temperature, draft_threshold=self.draft_threshold,
            sampler=inputs.sampler, ngram=NGramDrafter(ngram) if ngram else None,
            ngram_len=self.ngram_len,
            controller=_controller(draft_len, self.max_draft_len, inputs,
                                   ("self_speculative", id(head), exit_layer, ngram or 0)))
        return GenerateOutput(sequences=sequences, stats=stats)


@register_decoding_strategy("anpd")
@dataclass
class ANPD(DecodingStrategy):
    """Adaptive n-gram parallel decoding (Ou et al., 2024): drafts read from the text's own
    multi-level n-gram tables, verified by every block; no exit, no training (:mod:`.ngram`).

    ngram: the largest order N (tables of orders N .. 2). draft_len: tokens per draft (>= 1),
    or "auto" (chosen per step from measured costs and acceptance, at most
    ``max_draft_len``).
    """

    ngram: int = 4
    draft_len: int | str = "auto"
    max_draft_len: int = 8

    def __post_init__(self) -> None:
        _check_draft_len(self.draft_len)
        if self.max_draft_len == "auto":
            raise ConfigError("max_draft_len must be an int >= 1")
        _check_draft_len(self.max_draft_len, "max_draft_len")
        NGramDrafter(self.ngram)

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        fixed = self.draft_len if isinstance(self.draft_len, int) else self.max_draft_len
        stats = stats_for(inputs, self.registered_name, exit_layer=0, draft_len=fixed)
        sequences = self_speculative_decode(
            session_for(inputs, stats), None, 0, fixed, sampler=inputs.sampler,
            ngram=NGramDrafter(self.ngram), ngram_len=fixed,
            controller=_controller(self.draft_len, self.max_draft_len, inputs,
                                   ("anpd", self.ngram)))
        return GenerateOutput(sequences=sequences, stats=stats)

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
N-gram drafts are point masses q = one-hot(x): kept with probability p(x), else the token is
drawn from p with x removed, which is again exactly p.

**Other drafters and the draft length.** With a ``proposer`` (n-gram lookups, :mod:`.ngram`,
ANPD; or a layer-skipping draft model, :mod:`.layer_skip`), a row it proposes for drafts that
instead of the exit's tokens (fed through blocks [0, E) like the exit's, so verification is
unchanged; when no row uses the exit, all k + 1 tokens go through [0, E) in one pass); with no
exit head at all (strategies ``anpd``, ``layer_skip``) E = 0 and verification runs every
block. With a ``controller`` (:mod:`.draft_control`, ``draft_len="auto"``) each step's lengths
come from the run's own timed costs and acceptance; a step with nothing to draft is a plain
decoding step (:func:`.greedy.plain_step`).

**Balanced drafting** (with a controller, more than one running row; exitwise's addition, no
paper does this): rows that accept differently drift apart, and when the first rows reach
their budget the last ones finish in a tail of steps with fewer rows at nearly the cost of
full ones (on a tiny model a one-row step costs what a four-row step does; the controller,
which values each step by its own tokens per second, cannot see that cost coming). So a row
that is ``l`` tokens ahead of the running row with the most left to emit drafts ``l`` fewer
(at least 0): no row gets more than the step's draft length ahead, the most-behind row drafts
as chosen, and the step's cost (set by its longest draft) is unchanged. Lossless like every
per-row length; fixed draft lengths keep every row's length as asked.
A feature-conditioned exit reads, for the first draft of a step, the final state that chose the
pending token (``session.final_hidden``, kept from the prefill and from each verification).

**Token trees** (``tree_width`` > 1, :mod:`.token_tree`): each draft also gets the
exit's next choices as sibling leaves, fed through blocks [0, E) with the step's last draft
pass and verified in the same call under a tree attention mask; with ``"confidence"`` a depth
gets as many candidates as SWIFT's rule gives the exit's top-1 probability there (the
reference's ``get_choices_list`` applied to an exit head, not a draft model; the step's
shape takes the largest count among the rows drafting at that depth); acceptance may end on a
sibling, whose slot then moves into place in every cache layer. Greedy keeps the path greedy
would take; sampling tries the rejected draft's siblings against the residual law
(:func:`.token_tree.accept_sampled`), still lossless. A draft model (a ``proposer`` that
leaves ``tree_siblings`` and ``tree_widths`` after proposing, e.g. SWIFT's) brings its own
tree: its siblings are embedded with the chain and verified the same way.
"""

from __future__ import annotations

import time

import torch

from ..backbones.kernels import rerouted
from ..errors import ConfigError
from ..heads.lm import LMHead
from .draft_control import DraftLengthController
from .exit_drafts import draft_sequentially
from .greedy import plain_step
from .ngram import Proposer
from .sampling import SamplingConfig
from .session import DecodeSession
from .step_timer import StepTimer
from .token_tree import ChainTree, accept_greedy, accept_sampled, check_tree_width


@torch.inference_mode()
def self_speculative_decode(
    session: DecodeSession,
    head: LMHead | None,
    exit_layer: int,
    draft_len: int,
    temperature: float = 1.0,
    draft_threshold: float | None = None,
    sampler: SamplingConfig | None = None,
    proposer: Proposer | None = None,
    proposal_len: int | None = None,
    controller: DraftLengthController | None = None,
    tree_width: int | str = 1,
) -> torch.Tensor:
    """Run ``session`` to the end drafting with ``head`` after ``exit_layer`` blocks and/or
    with n-gram lookups.

    head: the exit head (None: no exit drafts; then ``exit_layer`` must be 0 and a
        ``proposer`` given, e.g. ANPD alone; verification runs every block).
    temperature: the exit head's calibration temperature (its logits are divided by it).
    draft_threshold: a row stops drafting after its first draft whose top-1 probability
        (softmax of logits / temperature) is below this value (per row; see the module
        docstring).
    sampler: None or greedy -> lossless greedy; sampling -> speculative rejection sampling.
    proposer: drafts known before the step (:class:`~.ngram.Proposer`: n-gram lookups,
        :mod:`.ngram`, or a layer-skipping draft model, :mod:`.layer_skip`); a row it proposes
        for (up to ``proposal_len`` tokens, default ``draft_len``) drafts that instead of the
        exit head's tokens.
    controller: chooses each step's draft lengths from measured costs and acceptance
        (``draft_len`` and ``proposal_len`` are then ignored; :mod:`.draft_control`).
    tree_width: > 1 verifies a token tree: each draft also has the exit's next
        ``tree_width - 1`` choices as sibling leaves (:mod:`.token_tree`); "confidence":
        SWIFT's count per depth from the exit's top-1 probability there
        (:func:`.token_tree.confidence_widths`).
    Returns the sequences (B, T + N).
    """
    sampler = sampler or SamplingConfig()
    sampling = sampler.do_sample
    bb = session.backbone
    stats = session.stats
    num_layers, e = bb.num_layers, exit_layer
    if head is None and (e != 0 or proposer is None):
        raise ConfigError("drafting without an exit head needs exit_layer 0 and a proposer "
                          "(n-gram drafts or a layer-skipping draft)")
    proposal_len = draft_len if proposal_len is None else proposal_len
    check_tree_width(tree_width)
    if tree_width != 1 and (head is None or head.uses_cache):
        raise ConfigError("token trees take their siblings from an exit head without a "
                          "cache of its own (no block adapter); tree_width must be 1 here")

    def fill_head_cache(hidden, ctx):  # a block adapter attends over the prompt too
        head.token_logits(hidden, ctx)

    uses_cache = head is not None and head.uses_cache
    if proposer is not None:  # tables from each prompt's real tokens, keyed by original row
        proposer.start([ids[m.bool()].tolist() for ids, m in zip(session.prompt, session.mask)])
    first = session.prefill(split=e if head is not None else None,
                            on_split=fill_head_cache if uses_cache else None)
    first = sampler.choose(first)
    session.pending = first
    session.emit([[t] for t in first.tolist()])
    session.drop_finished()

    # the proposer's acceptance is kept per level where it has levels (n-gram match lengths)
    levels = list(getattr(proposer, "levels", None) or []) if controller is not None else []
    proposer_sources = levels or ([proposer.source] if proposer is not None else [])
    sources = (["exit"] if head is not None else []) + proposer_sources
    while session.unfinished:
        a = session.active
        running = session.running()
        device = session.pending.device
        if proposer is not None:  # before the step, resting or not; not drafting time
            proposer.prepare(session)
        t_top = time.perf_counter()  # choosing and setting up a step cost time too
        if controller is not None:
            controller.begin_step()
            if not uses_cache and controller.resting(a, sources):  # plain decoding wins
                _plain_step(session, e, sampler, controller, t_top, timed=False)
                continue
        t_proposal = 0.0  # a draft model's passes, timed on their own
        if head is None:
            k_exit = 0
        elif controller is not None:
            k_exit = controller.choose(a, "exit", "per_token")
        else:
            k_exit = draft_len
        looked: list[list[int]] | None = None  # n-gram continuations, looked up first
        if proposer is not None:
            passes_mode = proposer.passes if proposer.passes != "none" or not e else "one"
            if controller is not None and levels:
                # Lookups cost next to nothing: look first (up to the longest length), then
                # choose lengths only for the levels some row found a continuation at (on a
                # small model choosing for every level costs a tenth of a step).
                left = session.remaining().tolist()
                looked = proposer.propose_rows(
                    session, [min(controller.max_len, n - 1) if alive else 0
                              for n, alive in zip(left, running)])
                present = dict.fromkeys(n for n in proposer.row_levels if n is not None)
                want = {n: controller.choose(a, n, passes_mode) for n in present}
            elif controller is not None:
                want = {n: controller.choose(a, n, passes_mode) for n in proposer_sources}
            if controller is not None:
                if head is not None:  # where the exit's drafts promise more tokens per
                    # second, rows of that level draft with the exit instead
                    want = {n: c if controller.prefers(n, "exit") else 0
                            for n, c in want.items()}
                cap = max(want.values(), default=0)
            else:
                cap = proposal_len
        if controller is not None and not uses_cache and not k_exit and (
                proposer is None or not cap):
            # the controller chose plain decoding: a plain step, built as leanly as a
            # resting one (on a small model the row tensors below cost a tenth of a step)
            _plain_step(session, e, sampler, controller, t_top)
            continue
        live = torch.tensor(running, dtype=torch.bool, device=device)
        # Each row's k_r: at most its own budget (what it may still emit) minus the verified
        # token; then the exit's (or the controller's) length or its n-gram draft's length.
        budget = (session.remaining().to(device) - 1).clamp(min=0)
        # Balanced drafting (automatic lengths, batch > 1): a row ahead of the most-behind
        # row by `lead` tokens drafts `lead` fewer (see the module docstring).
        lead = (_lead(budget, live) if controller is not None and sum(running) > 1
                else None)
        proposals: list[list[int]] = [[] for _ in range(a)]
        row_sources: list[str] = ["exit"] * a  # whose acceptance each row's drafts inform
        if proposer is not None:
            src = proposer.source
            if looked is not None:  # already looked up, within each row's budget
                proposals = looked
            else:
                caps = [min(cap, int(b)) if alive else 0 for b, alive in zip(budget, running)]
                t_prop = time.perf_counter()
                proposals = proposer.propose_rows(session, caps)
                if controller is not None and proposer.passes == "per_draft" and max(caps):
                    t_proposal = time.perf_counter() - t_prop
                    controller.record_proposal(a, src, t_proposal, max(caps))
            if levels:  # each row's draft cut to the length chosen for its match's level
                named = proposer.row_levels
                proposals = [p[:want[n]] if n is not None else p
                             for p, n in zip(proposals, named)]
                row_sources = [n if p else "exit" for p, n in zip(proposals, named)]
            else:
                row_sources = [src if p else "exit" for p in proposals]
        proposed = torch.tensor([bool(p) for p in proposals], dtype=torch.bool, device=device)
        row_len = torch.where(proposed,
                              torch.tensor([len(p) for p in proposals], device=device),
                              budget.clamp(max=k_exit))
        row_len = torch.where(live, row_len, torch.zeros_like(row_len))
        if lead is not None and bool(lead.any()):
            row_len = (row_len - lead).clamp(min=0)
            proposals = [p[:n] for p, n in zip(proposals, row_len.tolist())]
        k = int(row_len.max()) if a else 0
        if k == 0 and not uses_cache:  # nothing to draft: a plain decoding step, as lean
            # as a resting one, so it is timed from here (no choosing counted)
            _plain_step(session, e, sampler, controller, t_top)
            continue
        # A drafting step also pays for choosing its lengths and building its rows (a fixed
        # amount per step that a resting plain step does not pay): counted with verifying.
        timer = StepTimer(controller, device, since=t_top, excluded=t_proposal)

        tree: ChainTree | None = None
        if head is None or not bool((live & ~proposed & (row_len > 0)).any()):
            # Every draft is known up front: one pass over the k + 1 tokens below the exit.
            fed_all = _padded(session.pending, proposals, k)
            proposed_tree = getattr(proposer, "tree_siblings", None) if head is None else None
            if proposed_tree is not None:  # a draft model's tree (SWIFT's, :mod:`.token_tree`)
                tree = ChainTree(k, proposer.tree_widths[:k])
                siblings = proposed_tree[:, :k, : tree.max_width - 1]
                ctx = session.context(0, tree.size, tree)
                fed_all_tree = torch.cat([fed_all, tree.flat_siblings(siblings)], 1)
                hidden = bb.embed(fed_all_tree, ctx.positions)
            else:
                ctx = session.context(0, k + 1)
                hidden = bb.embed(fed_all, ctx.positions)
            if e:
                hidden = bb.run_layers(hidden, 0, e, ctx)
                if uses_cache:
                    with rerouted(hidden):
                        head.draft_logits(hidden, ctx)
                    stats.head_applications += sum(running) * (k + 1)
            states, fed = hidden, list(fed_all.unbind(1))
            drafts, draft_probs = fed[1:], []
            if tree is None:
                siblings = None
            if sampling and k:
                v = bb.vocab_size
                draft_probs = [torch.nn.functional.one_hot(t, v).float() for t in drafts]
            passes = 1 if e else 0
            positions = k + 1  # the pass fed every position at once
            sequential = e
        else:
            states_l, fed, drafts, draft_probs, k, row_len, passes, siblings, tree = (
                draft_sequentially(session, head, e, k, row_len, live, proposals, proposed,
                                    temperature, draft_threshold, sampler, stats, tree_width,
                                    timer))
            states = torch.cat(states_l, 1)
            positions = 1  # the first pass fed each row's pending token alone
            sequential = passes * e
        timer.drafted()

        if tree is None:
            tree = ChainTree(k, 1)
        q = tree.size
        if siblings is not None:
            fed = fed + list(tree.flat_siblings(siblings).unbind(1))
            if controller is not None and k:
                controller.record_tree(k, q)
        ctx = session.context(0, q, tree if siblings is not None else None)
        hidden = bb.run_layers(states, e, num_layers, ctx)
        target_logits = bb.lm_logits(bb.final_norm(hidden))  # (A, k+1, V)
        last_final = hidden
        drafted = torch.stack(drafts, 1) if k else session.pending[:, None][:, :0]  # (A, k)
        if sampling:
            p = sampler.probs(target_logits)
            q_all = torch.stack(draft_probs, 1) if k else p[:, :0]
            accepted, path, nxt, took = accept_sampled(
                tree, drafted, q_all, siblings, p, row_len, sampler.generator)
        else:
            # the longest verified prefix (a row's own draft length at most), or a tree path
            accepted, path, nxt, took = accept_greedy(
                tree, drafted, siblings, target_logits.argmax(-1), row_len)
        if controller is not None:
            outcomes: dict[str, tuple[list[int], list[int]]] = {}
            for source, n, k_r, alive in zip(row_sources, accepted.tolist(), row_len.tolist(),
                                             running):
                if alive and k_r > 0:
                    got, tried = outcomes.setdefault(source, ([], []))
                    got.append(n)
                    tried.append(k_r)
            for source, (got, tried) in outcomes.items():
                controller.record_acceptance(source, got, tried)
        # the final state at the slot that chose each row's next token (conditioned exits)
        rows_a = torch.arange(a, device=device)
        session.final_hidden = last_final[rows_a, path[rows_a, accepted]]
        best = int(accepted.max())
        kept_tokens = torch.stack(fed, 1).gather(1, path)
        if bool(took.any()):
            session.keep_step_slots(path)  # a sibling's slot moves next to its parent
        elif q > best + 1:
            session.cache.crop(-(q - best - 1))  # slots no row kept
        valid = torch.arange(best + 1, device=device)[None, :] <= accepted[:, None]
        session.commit(kept_tokens, valid, accepted + 1, nxt)
        stats.sibling_accepted += int(took.sum())

        stats.iterations += 1
        stats.step_draft_lengths.append(k)
        stats.layer_applications += sum(running) * q * num_layers
        stats.sequential_layers += sequential + (num_layers - e)
        rows = session.rows.tolist()
        n_list = accepted.tolist()
        before = [len(session.generated[r]) for r in rows]
        session.emit([kept_tokens[i, 1 : n + 1].tolist() + [t]
                      for i, (n, t) in enumerate(zip(n_list, nxt.tolist()))])
        mine: tuple[list[int], list[int]] = ([], [])  # the proposer's rows: kept, drafted
        for r, n, k_r, alive, by_proposal, had in zip(rows, n_list, row_len.tolist(), running,
                                                      proposed.tolist(), before):
            if alive:
                # accepted drafts a row emitted: none past its EOS, stop string or budget
                kept = min(n, len(session.generated[r]) - had)
                stats.drafted[r] += k_r
                stats.accepted[r] += kept
                if by_proposal and k_r:
                    mine[0].append(n)
                    mine[1].append(k_r)
                if by_proposal and proposer.source == "ngram":
                    stats.ngram_drafted += k_r
                    stats.ngram_accepted += kept
        if mine[0] and hasattr(proposer, "observe"):  # e.g. an adaptive draft threshold
            proposer.observe(*mine)
        session.drop_finished()
        timer.verified(a, q, passes, positions)  # the whole step: bookkeeping differs by k
        if controller is not None:
            emitted = sum(n + 1 for n, alive in zip(n_list, running) if alive)
            controller.record_step(a, True, emitted, time.perf_counter() - t_top)
    return session.sequences()


def _plain_step(session: DecodeSession, e: int, sampler: SamplingConfig,
                controller: DraftLengthController | None, since: float,
                timed: bool = True) -> None:
    """A step with k = 0: :func:`.greedy.plain_step`. With ``timed``, the blocks below the
    exit are timed as the draft pass and the rest (bookkeeping included) as verifying one
    position, so that the controller sees the same costs as on the drafting path (a resting
    step times nothing); the whole step, from ``since`` (perf_counter when it began, its
    choosing included), is recorded as a realized plain step."""
    a, emitted = session.active, sum(session.running())
    timer = StepTimer(controller if timed else None, session.pending.device)
    plain_step(session, sampler, e, timer.drafted)
    session.stats.step_draft_lengths.append(0)
    timer.verified(a, 1, 1 if e else 0)
    if controller is not None:
        controller.record_step(a, False, emitted, time.perf_counter() - since)


def _lead(budget: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """(A,) how many tokens each running row is ahead of the running row with the most left
    to emit (0 for that row and for rows not running); budget, live: (A,)."""
    behind = int(budget[live].max())
    return torch.where(live, (behind - budget).clamp(min=0), torch.zeros_like(budget))


def _padded(pending: torch.Tensor, proposals: list[list[int]], k: int) -> torch.Tensor:
    """(A, k + 1): each row's pending token, then its proposal padded with its pending token
    (padding slots are never kept: the row's k_r stops before them)."""
    rows = [[t] + p + [t] * (k - len(p)) for t, p in zip(pending.tolist(), proposals)]
    return torch.tensor(rows, dtype=torch.long, device=pending.device)

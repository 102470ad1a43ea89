"""CALM-style early-exit greedy decoding with a shared KV cache.

Per decoded token, every active row runs the blocks one by one; after each exit depth the exit
head's logits go to a token-level policy (``calm_softmax`` / ``calm_top2`` /
``calm_saturation`` / ``calm_learned`` or any registered one). A row that exits emits the exit
head's argmax; in ``propagate`` / ``recompute`` mode its hidden state is *frozen*: the
remaining blocks still run on it, but only to write that token's keys/values, and their
outputs are discarded (``skip`` mode does not run them; see below). Rows that never exit emit
the full model's argmax. With a never-exit policy this is plain greedy decoding, token for
token, in every mode.

Keys/values of the skipped layers (the slot of a token that exited at depth d, layers >= d):

- ``kv="propagate"`` (CALM's state propagation): layer l's K/V are computed from the frozen
  exit state h_d, i.e. block l runs on h_d (its attention projects norm_l(h_d) to K, V) and the
  output is dropped. Running the block, rather than the K/V projections alone, keeps one code
  path for every supported family (the adapter only exposes whole blocks); its extra MLP
  compute is counted in the stats. These K/V stay approximate for the rest of the run.
- ``kv="recompute"`` (deferred, FREE-style): the propagated K/V are placeholders. At the next
  step the previous slot is cropped from layers >= d_min (the shallowest exit depth in the
  batch) and recomputed *exactly* there, as a second column next to the new token, from its
  true hidden state at depth d_min. So every slot but the last committed one ends up with the
  full model's K/V for the emitted tokens (the new token attends to the exact K/V).

- ``kv="skip"`` (FREE's synchronized parallel decoding, Bae et al. 2023; CALM's deferred
  state propagation done exactly): an exited token's deeper layers are *not run* at its own
  step. The step stops at depth ``stop`` = the deepest exit any running row of the batch
  needed (L if one row did not exit); every lane of the batch runs its true hidden state up
  to ``stop`` (a lane costs nothing in sequential time, and its K/V then are the full
  model's). The slot's layers >= ``stop`` stay out of the cache and its exact state after
  ``stop`` blocks is kept. A later step that runs layer l first appends the deferred slots
  that are missing there, as extra columns of the same block call as its new token (one
  parallel call, causal among the columns), so the new token attends to the full model's K/V
  of every earlier token at every layer it runs. Deferred slots accumulate while steps stop
  early and are flushed by the next step that runs deep enough; slots nothing deeper ever
  reads are never computed. Invariant: at every layer the missing slots are a suffix of the
  committed ones (a slot's frontier never exceeds an older slot's), so the HF cache stays an
  append-only tensor per layer. Tokens equal ``recompute``'s (both attend to exact K/V).

Honest cost. ``propagate`` / ``recompute``: one batch shares one cache, so every row's slot
passes through all L blocks at its own step (propagation / recomputation fill what exiting
skipped): early exits are *correct but not faster* in compute, and ``sequential_layers`` is
L per step. ``skip``: ``sequential_layers`` grows by ``stop`` per step and
``layer_applications`` counts exactly the row x column block runs done (deferred columns
included, also in ``fill_applications``), so both really drop when tokens exit early.
``decision_layer_applications`` counts the blocks each token needed before its exit;
``token_depths`` records each token's exit depth.

Online-calibrated policies (``observes_consistency``, e.g. FREE's ``free_bmm``): the decoder
pairs each token's confidence at the first exit (``state["shallow_conf"]``) and that exit's
argmax with the full model's argmax for the same slot once it is known, and hands the pairs to
``policy.observe(confidence, consistent)``; ``policy.begin_sequence()`` runs at the start of
each call. The full model's prediction is known at once for a token that did not exit; for one
that exited, ``skip`` mode gets it when a later step runs its deferred slot to the last layer
and ``recompute`` mode when the next step recomputes it (one extra LM-head read-out per such
slot, spent only for these policies); ``propagate`` never computes it, so those tokens give no
pair.
Shapes: A active rows, S cache slots, H hidden, V vocab, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..backbones.hf_decoder import DecodeContext
from ..errors import ConfigError
from ..policies.base import ExitPolicy
from .exit_points import ExitPoint, as_policy, check_exit, new_token_state, resolve_exit_points
from .outputs import GenerateOutput, GenerationStats
from .session import DecodeSession
from .strategies import (
    DecodeInputs,
    DecodingStrategy,
    register_decoding_strategy,
    session_for,
    stats_for,
)

KV_MODES = ("propagate", "recompute", "skip")


@dataclass
class EarlyExitStats(GenerationStats):
    """GenerationStats plus early-exit counters.

    kv: the KV mode. exit_depths: depths carrying exits (the last layer L closes the stack).
    token_depths: per row, blocks run before each decoded token was chosen (L = full depth;
        the first token comes from the prefill and is not listed).
    fill_applications: of ``layer_applications``, block runs that only wrote K/V for skipped
        layers (propagation) or computed deferred slots (recompute / skip).
    max_deferred: skip mode: the most slots waiting for their deeper layers at once.
    decision_layer_applications: sum over decoded tokens of their depth.
    """

    kv: str = "skip"
    exit_depths: list[int] = field(default_factory=list)
    token_depths: list[list[int]] = field(default_factory=list)
    fill_applications: int = 0
    decision_layer_applications: int = 0
    max_deferred: int = 0

    @property
    def mean_exit_depth(self) -> float:
        depths = [d for row in self.token_depths for d in row]
        return sum(depths) / len(depths) if depths else 0.0

    @property
    def early_exit_rate(self) -> float:
        """Fraction of decoded tokens chosen before the last layer."""
        depths = [d for row in self.token_depths for d in row]
        return sum(d < self.num_layers for d in depths) / len(depths) if depths else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["mean_exit_depth"] = self.mean_exit_depth
        out["early_exit_rate"] = self.early_exit_rate
        return out


@dataclass
class _Deferred:
    """The previous slot's skipped layers (recompute mode): depth (A,) where each row exited
    (L if it did not), at: depth -> (A, H) the slot's hidden state after that many blocks
    (exact for every row whose exit depth is >= that depth)."""

    depth: torch.Tensor
    at: dict[int, torch.Tensor]

    def select(self, idx: torch.Tensor) -> "_Deferred":
        return _Deferred(self.depth[idx], {d: h[idx] for d, h in self.at.items()})


class _ConsistencyTap:
    """Pairs (first-exit confidence, first-exit argmax == full model's argmax) per slot for a
    policy that calibrates online (see the module docstring). ``pending`` keeps, per original
    row, the slots scored at the first exit whose full-model prediction is not known yet,
    oldest first, as (confidence, first-exit token)."""

    def __init__(self, policy: ExitPolicy, rows: int) -> None:
        self.policy = policy
        self.pending: dict[int, list[tuple[float, int]]] = {r: [] for r in range(rows)}

    def push(self, rows: list[int], running: list[bool], conf: torch.Tensor,
             token: torch.Tensor) -> None:
        """One new slot per running row: conf (A,), token (A,) at the first exit."""
        for i, (r, live) in enumerate(zip(rows, running)):
            if live:
                self.pending[r].append((float(conf[i]), int(token[i])))

    def resolve(self, rows: list[int], running: list[bool], deep: torch.Tensor,
                which: torch.Tensor | None = None) -> None:
        """deep (A, m): the full model's argmax for each row's last m pending slots (slot
        order); only rows with ``which`` (A,) True (all when None). Older pending slots of
        those rows can no longer be resolved and are dropped."""
        confs: list[float] = []
        same: list[bool] = []
        for i, (r, live) in enumerate(zip(rows, running)):
            if not live or (which is not None and not bool(which[i])):
                continue
            pend, m = self.pending[r], min(len(self.pending[r]), deep.shape[1])
            for (c, tok), d in zip(pend[len(pend) - m:], deep[i, deep.shape[1] - m:].tolist()):
                confs.append(c)
                same.append(tok == d)
            self.pending[r] = []
        if confs:
            self.policy.observe(torch.tensor(confs), torch.tensor(same))


def _tap_for(policy: ExitPolicy, session: DecodeSession) -> _ConsistencyTap | None:
    if not getattr(policy, "observes_consistency", False):
        return None
    policy.begin_sequence()
    return _ConsistencyTap(policy, session.prompt.shape[0])


def _deep_argmax(bb: Any, hidden: torch.Tensor) -> torch.Tensor:
    """(..., H) states after the last block -> (...) the full model's argmax."""
    return bb.lm_logits(bb.final_norm(hidden)).argmax(-1)


def _token_start(
    session: DecodeSession, policy: ExitPolicy, hidden: torch.Tensor, big: int
) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token bookkeeping at the start of a decoding step, for the A active rows with
    embedded pending tokens ``hidden`` (A, H): the policy's state (position t of each row),
    exited (A,) False, depth (A,) = L, token (A,) 0."""
    a, device = hidden.shape[0], hidden.device
    t = torch.tensor([len(session.generated[r]) for r in session.rows.tolist()], device=device)
    state = new_token_state(policy, t, session.max_new_tokens, hidden)
    exited = torch.zeros(a, dtype=torch.bool, device=device)
    depth = torch.full((a,), big, dtype=torch.long, device=device)
    token = torch.zeros(a, dtype=torch.long, device=device)
    return state, exited, depth, token


def check_kv(kv: str) -> str:
    if kv not in KV_MODES:
        raise ConfigError(f"unknown kv mode {kv!r}; choose from {', '.join(KV_MODES)}")
    return kv


@torch.inference_mode()
def early_exit_decode(
    session: DecodeSession,
    points: list[ExitPoint],
    policy: ExitPolicy,
    kv: str = "skip",
) -> torch.Tensor:
    """Run ``session`` to the end with early exits at ``points``; returns sequences (B, T + N).

    ``session.stats`` should be an :class:`EarlyExitStats` (plain GenerationStats get the
    common counters only).
    """
    check_kv(kv)
    bb = session.backbone
    stats = session.stats
    big = bb.num_layers
    if any(not 1 <= p.depth < big for p in points):
        raise ConfigError(f"exit depths must be in 1..{big - 1}; got {[p.depth for p in points]}")
    points = sorted(points, key=lambda p: p.depth)
    if isinstance(stats, EarlyExitStats):
        stats.kv = kv
        stats.exit_depths = [p.depth for p in points] + [big]
        stats.token_depths = [[] for _ in range(session.prompt.shape[0])]

    tap = _tap_for(policy, session)
    first = session.prefill().argmax(-1)
    session.pending = first
    session.emit([[t] for t in first.tolist()])
    if kv == "skip":
        groups: list[_Group] = _drop(session, [])
        while session.unfinished:
            groups = _drop(session, _step_skip(session, points, policy, groups, tap))
        return session.sequences()
    deferred: _Deferred | None = None
    deferred = _drop(session, deferred)
    while session.unfinished:
        nxt, deferred = _step(session, points, policy, kv, deferred, tap)
        deferred = _drop(session, deferred)
    return session.sequences()


def _drop(session: DecodeSession, deferred: Any) -> Any:
    """drop_finished, keeping the deferred rows (a _Deferred, or skip mode's list of
    _Group) aligned with the surviving rows."""
    before = session.rows.tolist()
    session.drop_finished()
    if not deferred or session.active == len(before) or session.active == 0:
        return deferred
    where = {r: i for i, r in enumerate(before)}
    idx = torch.tensor([where[r] for r in session.rows.tolist()], device=session.mask.device)
    if isinstance(deferred, list):
        return [g.select(idx) for g in deferred]
    return deferred.select(idx)


@dataclass
class _Group:
    """Skip mode: consecutive committed slots whose layers >= ``frontier`` are not in the
    cache yet; hidden (A, n, H) their exact states after ``frontier`` blocks. A step keeps a
    list of groups, oldest first, frontiers strictly decreasing."""

    frontier: int
    hidden: torch.Tensor

    def select(self, idx: torch.Tensor) -> "_Group":
        return _Group(self.frontier, self.hidden.index_select(0, idx.to(self.hidden.device)))


def _step_skip(
    session: DecodeSession, points: list[ExitPoint], policy: ExitPolicy, groups: list[_Group],
    tap: _ConsistencyTap | None = None,
) -> list[_Group]:
    """Decode one token per active row, running blocks only up to the batch's exit depth;
    deferred slots ride along as extra columns from their frontier on. Returns the groups
    left deferred after this step."""
    bb = session.backbone
    stats = session.stats
    big = bb.num_layers
    a = session.active
    running = torch.tensor(session.running(), device=session.pending.device)
    n_run = int(running.sum())
    # Every column (deferred slots + the new token) sees all committed slots + itself; at layer
    # l the cache holds all but the k missing ones, which are the columns before the new one.
    ones = torch.ones(a, 1, dtype=torch.long, device=session.mask.device)
    mask = torch.cat([session.mask, ones], 1)  # (A, S + 1)
    slot_pos = torch.cat([session.slot_pos, session.next_pos[:, None]], 1)  # (A, S + 1)
    contexts: dict[int, DecodeContext] = {}

    hidden = bb.embed(session.pending[:, None], slot_pos[:, -1:])[:, 0]  # (A, H)
    state, exited, depth, token = _token_start(session, policy, hidden, big)
    by_depth = {p.depth: (k, p) for k, p in enumerate(points)}
    num_exits = len(points) + 1
    cols: torch.Tensor | None = None  # (A, k, H) deferred slots running in this call
    first_tok = token  # (A,) the first exit's argmax (for the tap)
    stop = big
    for layer in range(big):
        joining = [g.hidden for g in groups if g.frontier == layer]  # older than those running
        if joining:
            cols = torch.cat(joining + ([cols] if cols is not None else []), 1)
        k = 0 if cols is None else cols.shape[1]
        if k not in contexts:
            contexts[k] = DecodeContext(session.cache, slot_pos[:, -(k + 1):], mask, slot_pos)
        x = hidden[:, None] if cols is None else torch.cat([cols, hidden[:, None]], 1)
        out = bb.run_layers(x, layer, layer + 1, contexts[k])
        cols = out[:, :k] if k else None
        # Exited lanes keep running their true state: free in a batched call, and it makes
        # their K/V the full model's (nothing is propagated in this mode).
        hidden = out[:, -1]
        stats.layer_applications += n_run * (k + 1)
        stats.fill_applications += n_run * k
        d = layer + 1
        if d in by_depth:
            j, point = by_depth[d]
            live = ~exited
            now, tok, state = check_exit(policy, point, j, num_exits, hidden, live, state)
            stats.head_applications += int((live & running).sum())
            first_tok = tok if j == 0 else first_tok
            token = torch.where(now, tok, token)
            depth = torch.where(now, torch.full_like(depth, d), depth)
            exited = exited | now
            if not bool((running & ~exited).any()):
                stop = d
                break
    if stop == big:
        final = _deep_argmax(bb, hidden)
        token = torch.where(exited, token, final)
    if tap is not None:
        rows, live_rows = session.rows.tolist(), running.tolist()
        tap.push(rows, live_rows, state["shallow_conf"], first_tok)
        if stop == big:  # every deferred slot and the new one now have the full model's state
            deep = final[:, None] if cols is None else torch.cat(
                [_deep_argmax(bb, cols), final[:, None]], 1)
            tap.resolve(rows, live_rows, deep)
    stats.sequential_layers += stop
    stats.iterations += 1

    session.commit(session.pending[:, None], ones, ones[:, 0], token)
    for i, (r, live) in enumerate(zip(session.rows.tolist(), running.tolist())):
        if live:
            stats.decision_layer_applications += int(depth[i])
            if isinstance(stats, EarlyExitStats):
                stats.token_depths[r].append(int(depth[i]))
    session.emit([[x] for x in token.tolist()])
    if stop == big:
        return []  # every deferred slot reached the last layer: the cache is complete
    # Groups at the stop depth merge with the ones that ran and the new slot (slot order).
    older = [g for g in groups if g.frontier > stop]
    parts = [g.hidden for g in groups if g.frontier == stop]
    parts += ([cols] if cols is not None else []) + [hidden[:, None]]
    left = older + [_Group(stop, torch.cat(parts, 1))]
    if isinstance(stats, EarlyExitStats):
        stats.max_deferred = max(stats.max_deferred, sum(g.hidden.shape[1] for g in left))
    return left


def _step(
    session: DecodeSession,
    points: list[ExitPoint],
    policy: ExitPolicy,
    kv: str,
    deferred: _Deferred | None,
    tap: _ConsistencyTap | None = None,
) -> tuple[torch.Tensor, _Deferred | None]:
    """Decode one token for every active row; commit the pending token's slot."""
    bb = session.backbone
    stats = session.stats
    big = bb.num_layers
    a = session.active
    running = torch.tensor(session.running(), device=session.pending.device)
    n_run = int(running.sum())
    ctx1 = session.context(0, 1)  # the new token alone: mask (A, S + 1)
    # Recompute mode: the previous slot is redone from depth d_min together with the new token.
    d_min = big if deferred is None else int(deferred.depth.min())
    ctx2 = prev = None
    if d_min < big:
        for layer in range(d_min, big):
            session.cache.layers[layer].crop(-1)
        slot_pos = ctx1.slot_positions
        ctx2 = DecodeContext(session.cache, slot_pos[:, -2:], ctx1.attention_mask, slot_pos)
        prev = deferred.at[d_min][:, None]  # (A, 1, H) exact state after d_min blocks

    hidden = bb.embed(session.pending[:, None], ctx1.positions)[:, 0]  # (A, H)
    state, exited, depth, token = _token_start(session, policy, hidden, big)
    at: dict[int, torch.Tensor] = {}
    by_depth = {p.depth: (k, p) for k, p in enumerate(points)}
    num_exits = len(points) + 1
    first_tok = token
    for layer in range(big):
        if prev is not None and layer >= d_min:
            out = bb.run_layers(torch.cat([prev, hidden[:, None]], 1), layer, layer + 1, ctx2)
            prev = out[:, :1]
            stats.layer_applications += 2 * n_run
            stats.fill_applications += n_run
        else:
            out = bb.run_layers(hidden[:, None], layer, layer + 1, ctx1)
            stats.layer_applications += n_run
        frozen = exited & running
        stats.fill_applications += int(frozen.sum())
        # Rows that exited keep their exit state: the block ran only to write its K/V.
        hidden = torch.where(exited[:, None], hidden, out[:, -1])
        d = layer + 1
        if d in by_depth:
            at[d] = hidden
            k, point = by_depth[d]
            live = ~exited
            if bool(live.any()):
                now, tok, state = check_exit(policy, point, k, num_exits, hidden, live, state)
                stats.head_applications += int((live & running).sum())
                first_tok = tok if k == 0 else first_tok
                token = torch.where(now, tok, token)
                depth = torch.where(now, torch.full_like(depth, d), depth)
                exited = exited | now
    final = _deep_argmax(bb, hidden)
    token = torch.where(exited, token, final)
    if tap is not None:
        rows, live_rows = session.rows.tolist(), running.tolist()
        if prev is not None:  # the previous slot, recomputed exactly to the last layer
            tap.resolve(rows, live_rows, _deep_argmax(bb, prev[:, 0])[:, None])
        tap.push(rows, live_rows, state["shallow_conf"], first_tok)
        tap.resolve(rows, live_rows, final[:, None], which=~exited)
    stats.sequential_layers += big
    stats.iterations += 1

    ones = torch.ones(a, 1, dtype=torch.long, device=token.device)
    session.commit(session.pending[:, None], ones, ones[:, 0], token)
    for i, (r, live) in enumerate(zip(session.rows.tolist(), running.tolist())):
        if live:
            stats.decision_layer_applications += int(depth[i])
            if isinstance(stats, EarlyExitStats):
                stats.token_depths[r].append(int(depth[i]))
    session.emit([[x] for x in token.tolist()])
    nxt = _Deferred(depth, at) if kv == "recompute" else None
    return token, nxt


@register_decoding_strategy("early_exit")
@dataclass
class EarlyExit(DecodingStrategy):
    """CALM-style token-level early exit (greedy only): a token leaves at the first exit whose
    ``policy`` says so.

    policy: a token-level exit policy (object, name or dict; e.g. ``calm_softmax``).
    kv: the keys / values of skipped layers: "skip" (the default: filled exactly, in
    parallel, by a later step; the only mode where exits save compute), "propagate" (CALM's
    copy) or "recompute" (exact). exit_layers: the exit depths (default: all).
    """

    samples: ClassVar[bool] = False
    policy: Any = None
    kv: str = "skip"
    exit_layers: list[int] | None = None

    def __post_init__(self) -> None:
        check_kv(self.kv)

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        points = resolve_exit_points(inputs.model, inputs.backbone, self.exit_layers)
        stats = stats_for(inputs, self.registered_name, EarlyExitStats)
        sequences = early_exit_decode(session_for(inputs, stats), points,
                                      as_policy(self.policy), self.kv)
        return GenerateOutput(sequences=sequences, stats=stats)

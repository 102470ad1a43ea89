"""The exit head's drafts for one self-speculative step (:mod:`.self_speculative`).

Each draft position is one pass of blocks [0, E) and the exit head: the pending token first,
then each drafted token, until the step's draft length (or every row's ``draft_threshold``
stop, per row as in the calling module). A row with an n-gram proposal feeds its proposal
instead of the head's token (a point mass as its draft law when sampling). With a token tree
the exit's next choices at each depth are kept as sibling leaves and fed through [0, E) with
the last pass, so a tree costs no extra draft pass (:mod:`.token_tree`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..backbones.kernels import rerouted
from ..heads.lm import LMHead
from .sampling import SamplingConfig, draw
from .session import DecodeSession
from .token_tree import ChainTree, most_candidates, sibling_tokens, step_widths

if TYPE_CHECKING:
    from .step_timer import StepTimer


def draft_sequentially(
    session: DecodeSession, head: LMHead, e: int, k: int, row_len: torch.Tensor,
    live: torch.Tensor, proposals: list[list[int]], proposed: torch.Tensor,
    temperature: float, draft_threshold: float | None, sampler: SamplingConfig, stats: Any,
    tree_width: int | str = 1, timer: StepTimer | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int,
           torch.Tensor, int, torch.Tensor | None, ChainTree | None]:
    """The exit head's drafts, one pass of blocks [0, E) per position (see the module
    docstring); a row with an n-gram proposal feeds that instead of the head's token. With
    a tree (``tree_width`` > 1 or "confidence"), the exit's next choices at each depth become
    sibling leaves, fed through [0, E) with the last pass (:mod:`.token_tree`); "confidence"
    sizes each depth by the exit's own top-1 probability there (its law before an n-gram
    row's proposal replaces its token), the largest count among the rows still drafting.
    Returns (states per slot (A, n, H), fed chain tokens, drafts, draft probs (sampling), k,
    row_len, passes, siblings (A, k, max width - 1) or None, the step's tree or None: a chain).
    ``timer``: times the first pass's blocks alone (the unit the controller keeps
    verification costs in)."""
    bb = session.backbone
    sampling = sampler.do_sample
    running = live.tolist()
    tokens = session.pending
    fed = [tokens]
    states: list[torch.Tensor] = []
    drafts: list[torch.Tensor] = []
    draft_probs: list[torch.Tensor] = []  # q_j (A, V), sampling only
    most = most_candidates(tree_width, sampling)
    siblings: list[torch.Tensor] = []  # (A, most - 1) per depth, token trees only
    top1: list[list[float]] = []  # each row's top-1 draft probability per depth ("confidence")
    tree: ChainTree | None = None
    proposal_rows = proposed.nonzero()[:, 0].tolist()
    drafting = live & (row_len > 0)  # rows still drafting
    exit_rows = ~proposed
    j = 0
    while True:
        if j == k and siblings:  # the last pass also feeds every sibling leaf
            widths = (step_widths(top1, row_len.tolist(), sampling)
                      if tree_width == "confidence" else (int(tree_width),) * k)
            # a draft vocabulary smaller than a width has fewer candidates than that
            tree = ChainTree(k, tuple(min(w, most) for w in widths))
            if tree.max_width == 1:  # every depth sure (sampling counts): a plain chain
                tree, siblings = None, []
                new = tokens[:, None]
                ctx = session.context(j, 1)
            else:
                padded = torch.stack(siblings, 1)[:, :, : tree.max_width - 1]
                new = torch.cat([tokens[:, None], tree.flat_siblings(padded)], 1)
                ctx = session.context(k, new.shape[1], tree)
        else:
            new = tokens[:, None]
            ctx = session.context(j, 1)
        t_pass = timer.now() if timer is not None and j == 0 else None
        hidden = bb.run_layers(bb.embed(new, ctx.positions), 0, e, ctx)
        if t_pass is not None:
            timer.unit = timer.now() - t_pass
        states.append(hidden)
        if j < k or head.uses_cache:  # keep a block adapter's cache aligned with blocks < E
            # (A, K) over the head's draft vocabulary (K = V without one); a conditioned exit
            # reads the final state that chose the pending token (first draft only)
            cond = session.final_hidden[:, None] if (
                j == 0 and head.conditioned and session.final_hidden is not None) else None
            with rerouted(hidden):  # few-row kernels where this row count pays
                logits = head.draft_logits(hidden, ctx, cond)[:, -1]
            stats.head_applications += sum(running)
        if j == k:
            break
        if sampling:
            q_j = sampler.probs(head.expand_logits(logits).float() / temperature)
            tokens = draw(q_j, sampler.generator)
        else:
            tokens = head.compact_argmax(logits)
        if tree_width == "confidence":  # the exit's own confidence, before any proposal
            sure = q_j if sampling else torch.softmax(logits.float() / temperature, -1)
            top1.append(sure.amax(-1).tolist())
        here = [i for i in proposal_rows if j < len(proposals[i])]
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
        if most > 1:
            most = min(most, logits.shape[-1])  # K candidates at most
            siblings.append(sibling_tokens(head.compact_topk(logits, most), tokens, most - 1))
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
    if tree is None:
        return states, fed, drafts, draft_probs, k, row_len, j + 1, None, None
    return (states, fed, drafts, draft_probs, k, row_len, j + 1,
            torch.stack(siblings, 1)[:, :, : tree.max_width - 1], tree)

"""Token-tree verification: several candidate continuations verified in one pass.

A chain drafter (the exit head, or n-gram lookups) proposes one token per depth; when the
full model disagrees at depth d, the step ends there even if the exit's *second* choice was
the right one. A token tree verifies those alternatives too, in the same verification call:
the step's slots hold a tree, each new token attends only to the committed context and its
own ancestors (a tree attention mask, :class:`~exitwise.backbones.hf_decoder.DecodeContext`
``tree``), and each node sits at position next_pos + depth. One forward then gives the full
model's next-token choice after every node, exactly as if each root-to-node path had been fed
alone (the test checks this against sequential verification for every decoder family).

**The tree here** (:class:`ChainTree`): the draft chain d0 -> x1 -> ... -> xk (slots 0..k),
plus, at every depth d = 1..k, ``width - 1`` *sibling leaves* of x_d: the exit head's next
most likely tokens after x_(d-1) (top-``width`` of its logits without x_d). Those logits
exist anyway (the exit computed them to draft x_d), and the siblings' states below the exit
are computed in the step's last draft pass together with xk, so the tree costs no extra draft
pass, only ``k (width - 1)`` more verified positions. The mechanism follows Medusa's reference
(Cai et al. 2024, ``medusa/model/utils.py``): ``generate_medusa_buffers`` builds the same
ancestor-only attention mask and depth-based position ids over candidates in topological
order, and ``evaluate_posterior`` (greedy) keeps the longest candidate path whose every token
is the model's argmax after its prefix; SpecInfer (Miao et al. 2024) verifies token trees
likewise. Deviations: the tree's shape -- Medusa's trees are top-k products of its heads'
choices along several depths, tuned offline (``medusa_choices``); here a chain from one exit
plus its siblings, since sub-trees under a sibling would need draft passes of their own
(blocks below the exit on each sibling); a static shape rather than one tuned per model
(Sequoia); and the accepted path's keys/values are moved into place per row of a ragged batch
(Medusa decodes one sequence).

**A draft model's trees** (SWIFT's "dynamic verification", Xia et al., 2024, Sec. 4.2; the
reference's ``get_choices_list``, ``generate_swift_buffers``, ``swift_draft`` with
``TOPK = 10``): a draft model that is the LLM minus some sub-layers (:mod:`.layer_skip`,
:mod:`.swift`) computes its full next-token distribution at every draft, so each draft's next
choices can be siblings too, and the tree has the same shape -- the chain plus leaves at each
depth (the reference's choices ``[0] * d + [i]``) -- with a width per depth
(``ChainTree(k, (w_1, ..., w_k))``): :func:`confidence_widths` gives the reference's counts,
more candidates where the draft's top-1 probability is lower. An exit head takes the same
rule (``self_speculative(tree_width="confidence")``) on its own top-1 probability, a use the
paper does not make (its drafts come from the skipping model). Siblings are fed at
verification with the chain (the draft model needs no pass over them). Deviations: with a
batch, one tree shape serves the step, so a depth's width is the largest count among the rows
drafting there (at batch 1 the reference's); rows keep their own siblings; sampled trees use
the draft's top choices after its own (the reference draws its candidates from the draft's
law without replacement) -- both are fixed before any acceptance coin, so the walk below is
exact either way. A padded siblings tensor (A, k, max width - 1) carries entries past a
depth's width that are not slots: acceptance never takes or tries them.

**Acceptance** (:func:`accept_greedy`), exactly greedy's choice: follow the chain while
x_(d+1) equals the full model's argmax after x_d (capped at the row's own draft length); at
the first mismatch, if a sibling at that depth equals the full model's argmax, accept it too
(siblings have no children, so the path ends there) and take the full model's argmax after
the sibling as the next token; else the argmax after the last kept chain node. Every emitted
token is the full model's argmax given the real tokens before it: lossless. The accepted
path's cache slots are then moved to the front of the step's slots
(:meth:`~.session.DecodeSession.keep_step_slots`); the other nodes are dropped.

**Sampling over the tree** (:func:`accept_sampled`), lossless: the chain is rejection-sampled
as without a tree (:func:`.sampling.speculative_accept`: x_d ~ q_d kept with probability
min(1, p/q)). At the first rejection, instead of drawing the next token from the residual
r = norm(max(0, p - q)) at once, the siblings s_1, s_2, ... of the rejected draft are tried as
point-mass drafts against r, one after the other: s_j is kept with probability r(s_j) (its
acceptance min(1, r(s_j) / 1)); on rejection r loses s_j and is renormalised (the residual of
r against the point mass on s_j). When a sibling is kept the next token is drawn from p after
the sibling (its slot's verified distribution); when none is, from the last r, which then has
no mass on the siblings. For any fixed list of candidates this sequence draws exactly from r:
P(s_1) = r(s_1), P(s_2) = (1 - r(s_1)) r(s_2) / (1 - r(s_1)) = r(s_2), ..., and the rest
r(y) for the others; so the step emits tokens with p's law exactly as the chain alone does,
and the siblings only shorten the way there. Reference read: EAGLE's ``evaluate_posterior``
(Li et al. 2024, ``eagle/model/utils.py``, sampling branch): at each depth its candidates are
tried in order as point masses (``qx = 1.0``: kept when a uniform draw is at most p(x), else
p(x) is zeroed and p renormalised), and after the last rejection the next token is drawn from
what is left; SpecInfer's multi-step speculative sampling (Miao et al. 2024) is the same walk
with candidates drawn from q. Deviation: the chain draft is not a point mass here but was
drawn from the exit's q, so it is kept with min(1, p/q) first and the point-mass walk over
the siblings starts from the residual r rather than from p (both orders are exact). Siblings
are the exit's top choices other than the drawn x_d, chosen before any acceptance coin is
tossed, so the argument holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import ConfigError
from .sampling import draw, residual_distribution, speculative_accept, uniform


def check_tree_width(value: object) -> int | str:
    """``value`` as a tree width: an int >= 1 (1 is a plain chain) or "confidence" (SWIFT's
    widths per depth from the draft's top-1 probability, :func:`confidence_widths`); else a
    ConfigError."""
    if isinstance(value, str) and value == "confidence":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"tree_width must be an int >= 1 (1: no tree) or 'confidence' "
                          f"(SWIFT's widths from the draft's confidence); got {value!r}")
    return value


@dataclass(frozen=True)
class ChainTree:
    """The tree of one step: a chain of ``k`` drafts after the pending token, each draft with
    sibling leaves: ``width - 1`` at every depth, or, with ``width`` a tuple of k ints,
    ``width[d - 1] - 1`` at depth d (SWIFT's trees, :func:`confidence_widths`). Slots: 0 the
    pending token d0, 1..k the chain, then the siblings depth by depth (depth d's s-th sibling
    at ``sibling_slot(d, s)``)."""

    k: int
    width: int | tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.width, tuple) and len(self.width) != self.k:
            raise ConfigError(f"a tree of {self.k} depths needs {self.k} widths; "
                              f"got {self.width!r}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Candidates at each depth 1..k (the chain's draft and its siblings)."""
        return self.width if isinstance(self.width, tuple) else (self.width,) * self.k

    @property
    def max_width(self) -> int:
        """The most candidates at any depth (1: a plain chain)."""
        return max(self.widths, default=1)

    @property
    def size(self) -> int:
        """Slots of the step: 1 + the sum of the widths (1 + k * width)."""
        return 1 + sum(self.widths)

    def _offsets(self) -> tuple[int, ...]:
        """Siblings before depth d's (index d - 1), in slot order."""
        out, total = [], 0
        for w in self.widths:
            out.append(total)
            total += w - 1
        return tuple(out)

    def sibling_slot(self, depth: int | torch.Tensor, s: int | torch.Tensor) -> torch.Tensor | int:
        """Slot of the ``s``-th sibling (0-based) at ``depth`` (1..k)."""
        if isinstance(self.width, int):
            return self.k + 1 + (depth - 1) * (self.width - 1) + s
        offsets = self._offsets()
        if isinstance(depth, torch.Tensor):
            before = torch.tensor(offsets or (0,), device=depth.device)[depth - 1]
        else:
            before = offsets[depth - 1]
        return self.k + 1 + before + s

    def sibling_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """(k, max_width - 1) bool: which entries of a padded siblings tensor are slots."""
        cols = torch.arange(self.max_width - 1, device=device)
        return cols[None, :] < torch.tensor(self.widths, device=device).reshape(-1, 1) - 1

    def flat_siblings(self, siblings: torch.Tensor) -> torch.Tensor:
        """(A, size - k - 1) the sibling tokens in slot order, from the padded (A, k,
        max_width - 1) tensor (entries past a depth's width are dropped)."""
        if isinstance(self.width, int):
            return siblings.flatten(1)
        return siblings[:, self.sibling_mask(siblings.device)]

    def depths(self, device: torch.device | None = None) -> torch.Tensor:
        """(size,) depth of each slot (its position past the pending token)."""
        chain = torch.arange(self.k + 1, device=device)
        sib = torch.arange(1, self.k + 1, device=device).repeat_interleave(
            torch.tensor(self.widths, dtype=torch.long, device=device) - 1)
        return torch.cat([chain, sib])

    def parents(self) -> list[int]:
        """Parent slot of each slot (-1 for the root)."""
        out = [-1] + list(range(self.k))
        for d, w in enumerate(self.widths, start=1):
            out += [d - 1] * (w - 1)
        return out

    def ancestors(self, device: torch.device | None = None) -> torch.Tensor:
        """(size, size) bool: [i, j] when slot j is slot i or one of its ancestors."""
        n = self.size
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parents()):
            anc[i, i] = True
            if p >= 0:
                anc[i] |= anc[p]
        return anc.to(device)

    def layout(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(depths, ancestors) on ``device``, built once per shape and device (a decoding
        step asks for them twice, at every step)."""
        return _layout(self, None if device is None else torch.device(device))


# SWIFT's candidates per depth by the draft's top-1 probability there (the reference's
# get_choices_list): above 0.95, 0.8, 0.5, else; greedy and sampling
CONFIDENCE_LEVELS = (0.95, 0.8, 0.5)
CONFIDENCE_WIDTHS = {False: (3, 5, 8, 10), True: (1, 3, 5, 10)}


def confidence_widths(top1: list[float], sampling: bool = False) -> tuple[int, ...]:
    """Candidates at each depth of a SWIFT tree (Xia et al., 2024, Sec. 4.2 "dynamic
    verification"; the reference's ``get_choices_list``): a depth whose draft had top-1
    probability p gets 3 candidates if p > 0.95, 5 if p > 0.8, 8 if p > 0.5, else 10 (greedy;
    sampling 1, 3, 5, 10): the less sure the draft, the more of its alternatives are
    verified."""
    counts = CONFIDENCE_WIDTHS[bool(sampling)]
    out = []
    for p in top1:
        level = next((i for i, t in enumerate(CONFIDENCE_LEVELS) if p > t), len(CONFIDENCE_LEVELS))
        out.append(counts[level])
    return tuple(out)


def most_candidates(tree_width: int | str, sampling: bool = False) -> int:
    """The most candidates a depth can have under ``tree_width`` (int or "confidence")."""
    if tree_width == "confidence":
        return max(CONFIDENCE_WIDTHS[bool(sampling)])
    return int(tree_width)


def nominal_width(tree_width: int | str, sampling: bool = False) -> float:
    """Verified positions per draft before any tree is seen (a draft-length controller's
    prior, :mod:`.draft_control`): the fixed width, or for "confidence" the middle count."""
    if tree_width == "confidence":
        counts = CONFIDENCE_WIDTHS[bool(sampling)]
        return float(counts[len(counts) // 2])
    return float(tree_width)


def step_widths(top1: list[list[float]], lengths: list[int],
                sampling: bool = False) -> tuple[int, ...]:
    """SWIFT's widths for one step of a batch: per depth j (``top1[j]``: each row's top-1
    draft probability there), the largest :func:`confidence_widths` count among the rows
    still drafting at j (``lengths[r] > j``; all rows when none is: the depth is then never
    verified anyway). One tree shape serves the batch; at batch 1 this is the reference's."""
    widths = []
    for j, probs in enumerate(top1):
        here = [p for p, c in zip(probs, lengths) if c > j] or probs
        widths.append(max(confidence_widths(here, sampling)))
    return tuple(widths)


@lru_cache(maxsize=64)
def _layout(tree: ChainTree, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    return tree.depths(device), tree.ancestors(device)


def sibling_tokens(top: torch.Tensor, chosen: torch.Tensor, count: int) -> torch.Tensor:
    """(A, count) the best ``count`` of each row's candidates ``top`` (A, count + 1), best
    first, other than its chosen draft ``chosen`` (A,) (when the draft is not among them, the
    first ``count`` candidates)."""
    is_chosen = (top == chosen[:, None]).to(torch.int8)
    order = torch.argsort(is_chosen, dim=1, stable=True)  # the chosen token last
    return top.gather(1, order)[:, :count]


def accept_greedy(
    tree: ChainTree,
    drafted: torch.Tensor,
    siblings: torch.Tensor | None,
    target: torch.Tensor,
    row_len: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance over a :class:`ChainTree` (see the module docstring).

    drafted: (A, k) chain tokens x1..xk. siblings: (A, k, max_width - 1) sibling tokens per
    depth, padded past a depth's width (None for a chain). target: (A, size) the full model's
    argmax after each slot. row_len: (A,) each row's own draft length (acceptance stops there).
    Returns (accepted (A,) drafts kept, path (A, best + 1) the slots of each row's kept tokens
    d0, ... in order (entries past a row's own path are unused), next token (A,), took_sibling
    (A,) bool).
    """
    a, k = drafted.shape
    device = drafted.device
    rows = torch.arange(a, device=device)
    if k:
        chain = (drafted == target[:, :k]).long().cumprod(1).sum(1)
        chain = torch.minimum(chain, row_len)
    else:
        chain = torch.zeros(a, dtype=torch.long, device=device)
    took = torch.zeros(a, dtype=torch.bool, device=device)
    last = chain.clone()  # slot whose argmax is the next token
    if siblings is not None and k and tree.max_width > 1:
        want = target[rows, chain]  # the full model's choice after the last kept chain node
        depth = (chain + 1).clamp(max=k)  # siblings of the first rejected chain draft
        cand = siblings[rows, depth - 1]  # (A, max_width - 1)
        real = tree.sibling_mask(device)[depth - 1]  # padding past a depth's width: no slot
        hit = (cand == want[:, None]) & real & (chain < row_len)[:, None]
        took = hit.any(1)
        slot = tree.sibling_slot(depth, hit.long().argmax(1))
        last = torch.where(took, slot, chain)
    accepted = chain + took.long()
    return accepted, kept_path(accepted, last, took), target[rows, last], took


def kept_path(accepted: torch.Tensor, last: torch.Tensor, took: torch.Tensor) -> torch.Tensor:
    """(A, best + 1) the slots of each row's kept tokens in order: the chain's slots 0..n,
    with the row's kept sibling ``last`` in place of its final entry where ``took``."""
    a = accepted.shape[0]
    best = int(accepted.max()) if a else 0
    path = torch.arange(best + 1, device=accepted.device).repeat(a, 1)
    if bool(took.any()):
        r = took.nonzero()[:, 0]
        path[r, accepted[r]] = last[r]
    return path


def accept_sampled(
    tree: ChainTree,
    drafted: torch.Tensor,
    q: torch.Tensor,
    siblings: torch.Tensor | None,
    p: torch.Tensor,
    row_len: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling over a :class:`ChainTree` (see the module docstring).

    drafted: (A, k) chain tokens, drafted[:, d] ~ q[:, d]. q: (A, k, V) their draft laws.
    siblings: (A, k, max_width - 1) or None (padded as for :func:`accept_greedy`).
    p: (A, size, V) the full model's processed law after every slot. row_len: (A,) each
    row's own draft length.
    Returns what :func:`accept_greedy` returns (accepted, path, next token, took_sibling)."""
    a, k = drafted.shape
    device = drafted.device
    accepted, nxt = speculative_accept(drafted, q, p[:, : k + 1], generator)
    # A row that kept all its own k_r < k drafts continues from p after its k_r-th draft (its
    # later drafts were never proposed); the draws before k_r are unaffected.
    cut = (accepted >= row_len) & (row_len < k)
    if bool(cut.any()):
        rc = cut.nonzero()[:, 0]
        nxt = nxt.clone()
        nxt[rc] = draw(p[rc, row_len[rc]], generator)
    accepted = torch.minimum(accepted, row_len)
    took = torch.zeros(a, dtype=torch.bool, device=device)
    last = accepted.clone()
    rejected = (accepted < row_len).nonzero()[:, 0]
    if siblings is not None and tree.max_width > 1 and k and rejected.numel():
        n = accepted[rejected]  # index of the rejected draft; its siblings sit at depth n + 1
        res = residual_distribution(p[rejected, n], q[rejected, n])  # (R, V)
        cand = siblings[rejected, n]  # (R, max_width - 1)
        real = tree.sibling_mask(device)[n]  # (R, max_width - 1): padding is never tried
        hit = torch.zeros(rejected.numel(), dtype=torch.bool, device=device)
        which = torch.zeros_like(n)
        for j in range(cand.shape[1]):
            tok = cand[:, j : j + 1]
            prob = res.gather(1, tok)[:, 0]
            keep = ~hit & real[:, j] & (uniform((len(n),), res, generator) < prob)
            which = torch.where(keep, j, which)
            hit |= keep
            # the residual of r against the point mass on s_j: r without s_j, renormalised
            # (a row whose r had all its mass on s_j kept s_j; it keeps its r, never drawn;
            # a padding entry was not tried, so r keeps its mass)
            rest = res.scatter(1, tok, 0.0)
            mass = rest.sum(1, keepdim=True)
            res = torch.where((mass > 0) & real[:, j : j + 1], rest / mass.clamp_min(1e-30), res)
        slot = tree.sibling_slot(n + 1, which)
        from_sibling = draw(p[rejected, slot], generator)
        from_rest = draw(res, generator)
        nxt = nxt.clone()
        nxt[rejected] = torch.where(hit, from_sibling, from_rest)
        took[rejected] = hit
        last[rejected] = torch.where(hit, slot, last[rejected])
    accepted = accepted + took.long()
    return accepted, kept_path(accepted, last, took), nxt, took

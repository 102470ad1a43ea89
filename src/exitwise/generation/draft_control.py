"""The draft length of each speculative step, chosen from measured costs and acceptance.

Speculation pays only when the tokens a step yields outweigh what drafting and verifying
cost; both sides depend on the machine, the model, the batch size and the text. A fixed
draft length that wins at batch 1 can lose at batch 4 (verifying k + 1 tokens of several rows
is no longer almost free), so ``draft_len="auto"`` decides per step instead, from what the
run itself has measured:

- **cost**: the wall-clock time of one draft pass (blocks below the exit and the exit head,
  per drafted position) and of verifying q = k + 1 positions, per active batch size. A
  shared machine goes through slow and fast phases lasting seconds (the same one-row
  verification measured 0.05 s and 0.08 s a few steps apart), and lengths are timed at
  different moments (one-token drafts while drafting pays, plain steps while it does not),
  so verification is kept as a multiple of one pass of the blocks below the exit (one
  position, no exit head) timed in the same step -- both slow down together -- and its cost
  is that multiple times the current such pass. Each quantity is the median
  of its latest ``window`` timings (a median, not a running mean: the first steps of a run
  are cold and there are spikes, and one such timing must not decide the next hundred
  steps). Without draft passes (drafts that need no pass below an exit) verification is
  kept in seconds. A verification length not yet timed is interpolated linearly between
  the nearest timed ones (extrapolated along the last two beyond them);
- **acceptance**: each source of drafts (the exit head, n-gram lookups) keeps, per draft
  position j, a discounted count of the rows that reached position j (every earlier draft
  kept) and of those whose j-th draft was kept too: alpha_j = kept_j / reached_j, from a
  Beta(1, 1) prior; a position never reached takes the deepest reached one's alpha. Positions
  differ (a feature-conditioned exit's first draft is kept far more often than its later
  ones), so no single geometric rate is assumed. A source may be finer than a drafter: the
  decoder keeps n-gram drafts per length of the match behind them ("ngram/3" .. "ngram/1",
  :class:`.ngram.NGramDrafter`), and chooses a length per such level.

A row drafting k tokens then yields E[tokens] = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_k per step
(a_j = alpha_j), and the step costs T(k) = (k + 1) * t_draft + t_verify(k + 1) when the exit
head drafts (the pending token and each draft pass through the blocks below the exit), one
pass of the k + 1 positions below the exit (kept as its own multiple of the one-position
pass: it costs more) or none when the drafts are known up front (n-gram lookups); the
controller picks the k in 0..max_len with the most tokens per second. k = 0 is plain greedy
decoding through the same path, so when speculation does not pay the decoder falls back to
it by measurement, never by a constant.
Until both a one-token draft and k = 0 are timed for the current batch size, it tries those
two (one step each; longer drafts are costed along the line through them until tried), and
until ``ACCEPT_MIN`` rows' first drafts are verified it drafts at least one token (a few
rejected drafts are no evidence that drafting does not pay); then
every ``explore_every``-th step it tries a neighbour of the best k when that neighbour's
estimate is within ``explore_margin`` of the best or it has been timed fewer than three
times (a first timing may be cold: a shape's first use), else only every 8 x
``explore_every`` steps, so the estimates follow the machine and the text as they drift
without paying for trials that are clearly worse; while drafting wins, plain decoding itself
is re-timed every 8 x ``explore_every`` steps (its cost is the baseline every draft length is
compared with, and a stale one would keep a losing draft length forever), for ``PLAIN_BURST``
steps in a row: enough of them for their realized rate to count (below), which one plain step
every 8 x ``explore_every`` never is (its evidence expires long before the next one).

The model above can be wrong where its parts are right (a step after a speculative one pays
for the cache it left, rows of a batch accept differently), so the controller also keeps
what was *realized*: per batch size, the tokens emitted and the wall-clock seconds of whole
drafting steps and of whole plain steps (sums discounted at every step of either kind, so
the evidence of a kind not run lately expires). When drafting steps have realized clearly
fewer tokens per second than plain steps (by more than 5%), plain decoding is chosen
whatever the model says, so a configuration the model favours but the clock does not is
dropped within a few steps; once that evidence has expired (a few tens of plain steps) the
model decides again. A plain step's pass below the exit runs no exit head, so it times the
unit, never a draft pass, and k = 0 is costed as that unit plus verifying one position.
Plain decoding that wins clearly (by ``explore_margin``) rests: the steps until the next
exploring one are plain, without choosing or timing; after a close call the next step
chooses again. With n-gram and exit drafts together, a row uses its n-gram
continuation only while n-gram drafts promise at least the exit's tokens per second
(:meth:`DraftLengthController.prefers`). The decoding strategies keep one controller per model
and drafter (and thread count, kernels, device), so what one ``generate`` call measured carries
over to the next: the calibration happens at first use.

Which k is chosen never changes what is generated (every draft is verified), only how fast.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


class _Timings:
    """The latest ``window`` timings of one quantity; its estimate is their median."""

    def __init__(self, window: int) -> None:
        self.samples: deque[float] = deque(maxlen=window)
        self.value = 0.0

    def add(self, seconds: float) -> float:
        self.samples.append(seconds)
        self.value = statistics.median(self.samples)
        return self.value


@dataclass
class _Costs:
    """One active batch size's step costs (seconds, and verification also in units of a
    draft pass): the medians of recent timings."""

    window: int = 16
    draft: float | None = None
    verify: dict[int, float] = field(default_factory=dict)  # q -> seconds
    # q -> verify(q) in units of one pass of the blocks below the exit (one position, no head)
    ratio: dict[int, float] = field(default_factory=dict)
    # q > 1 -> one pass of q positions below the exit, in the same units (drafts known up
    # front are fed through the blocks below the exit in one such pass)
    passes: dict[int, float] = field(default_factory=dict)
    proposal: dict[str, float] = field(default_factory=dict)  # source -> seconds per draft
    timings: dict[Any, _Timings] = field(default_factory=dict)  # what -> recent timings

    def add(self, what: Any, seconds: float) -> float:
        """Record a timing of ``what`` ("draft", ("verify", q), ("proposal", source)) and
        return its new estimate."""
        if what not in self.timings:
            self.timings[what] = _Timings(self.window)
        return self.timings[what].add(seconds)

    def verify_cost(self, q: int) -> float | None:
        """Seconds to verify q positions: timed, else interpolated linearly between the
        nearest timed lengths, else extrapolated along the last two (never decreasing)."""
        return _along(self.verify, q)

    def timed(self, q: int) -> int:
        """How many timings of verifying q positions the estimate holds (its window's)."""
        return max((len(self.timings[w].samples) for w in (("ratio", q), ("verify", q))
                    if w in self.timings), default=0)

    def unit(self) -> float | None:
        """Seconds of the current one-position pass of the blocks below the exit (None:
        not timed yet)."""
        t = self.timings.get("unit")
        return t.value if t is not None else None

    def pass_cost(self, q: int) -> float | None:
        """Seconds of one pass of q positions through the blocks below the exit (drafts
        known up front are fed that way). q = 1 is the unit; longer passes as timed (in
        units, at the current unit), else along the line through the timed ones and the
        unit; with none timed yet, the unit scaled as verification scales from 1 to q (the
        same kind of blocks, above the exit instead of below)."""
        unit = self.unit()
        if unit is None:
            return self.draft
        if q <= 1:
            return unit
        if self.passes:
            return unit * (_along({1: 1.0, **self.passes}, q) or 1.0)  # never None here
        v1, vq = self.verify_cost(1), self.verify_cost(q)
        return unit * (vq / v1 if v1 and vq else 1.0)


def _along(points: dict[int, float], q: int) -> float | None:
    """points[q] if there, else linear between the nearest points around q, else along the
    last two points beyond them (never decreasing); None without points."""
    if q in points:
        return points[q]
    known = sorted(points)
    if not known:
        return None
    below = [x for x in known if x < q]
    above = [x for x in known if x > q]
    if below and above:
        lo, hi = below[-1], above[0]
        w = (q - lo) / (hi - lo)
        return (1 - w) * points[lo] + w * points[hi]
    if len(known) < 2:
        return points[known[0]]
    lo, hi = (known[-2], known[-1]) if below else (known[0], known[1])
    slope = max(0.0, (points[hi] - points[lo]) / (hi - lo))
    edge = hi if below else lo
    return max(0.0, points[edge] + slope * (q - edge))


HISTORY = 1024  # chosen lengths kept per source (the latest)
REALIZED_MIN = 3  # discounted whole steps of a kind before their realized rate is trusted
CLOCK_MARGIN = 0.05  # the realized rates overrule the model only when this far apart
WARM = 3  # timings of a verification length before a cold first one is outvoted
ACCEPT_MIN = 8  # rows whose first draft was verified before plain decoding may win on it
REALIZED_DISCOUNT = 0.95  # per step of either kind: the evidence of about the last 20 steps


def _steps_to_count(minimum: float, discount: float) -> int:
    """The fewest consecutive steps of a kind whose discounted count reaches ``minimum``."""
    n, weight = 0, 0.0
    while weight < minimum:
        weight = weight * discount + 1.0
        n += 1
    return n


TREE_SMOOTHING = 0.9  # how much of the positions-per-draft estimate survives a tree step
PLAIN_BURST = _steps_to_count(REALIZED_MIN, REALIZED_DISCOUNT)  # 4 with the values above


class DraftLengthController:
    """Chooses each step's draft length; see the module docstring.

    max_len: the longest draft considered (>= 1). explore_every: steps between tries of a
    neighbour of the best length (0: never). window: each cost is the median of its latest
    ``window`` timings (1: the latest timing alone). discount: how much of the past
    acceptance counts survive each update (forgetting lets the estimate follow the text).
    explore_margin: a neighbour estimated within this
    fraction of the best rate is tried every ``explore_every`` steps. tree_width: steps with
    k drafts (of the exit head, or of a draft model: "per_token" and "per_draft" passes) verify
    1 + k * tree_width positions (token trees, :mod:`.token_tree`; 1: a chain); where the
    widths vary (SWIFT's trees) it is the prior, and each tree step moves it toward the
    positions per draft that step verified (:meth:`record_tree`).
    """

    def __init__(self, max_len: int = 8, explore_every: int = 16, window: int = 16,
                 discount: float = 0.98, explore_margin: float = 0.1,
                 tree_width: float = 1) -> None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ConfigError(f"the longest automatic draft must be an int >= 1; got {max_len!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be an int >= 1; got {window!r}")
        if not 0.0 < discount <= 1.0:
            raise ConfigError("discount must lie in (0, 1]")
        self.max_len = max_len
        self.tree_width = float(tree_width)
        self.explore_every = explore_every
        self.explore_margin = explore_margin
        self.window = window
        self.discount = discount
        self.costs: dict[int, _Costs] = {}
        # per source, per draft position j (index j - 1): rows that reached it, and kept it
        self.reached: dict[str, list[float]] = {}
        self.kept: dict[str, list[float]] = {}
        self.steps = 0
        self.history: dict[str, list[int]] = {}  # chosen lengths per source, for inspection
        # expected tokens per second of the last choice per source (absent while exploring)
        self.rates: dict[str, float] = {}
        # (rows, source) -> the step at which k = 0 last won clearly (see :meth:`resting`)
        self._zero_since: dict[tuple[int, str], int] = {}
        # (rows, drafting?) -> [discounted tokens, discounted seconds, steps] of whole steps
        self.realized: dict[tuple[int, bool], list[float]] = {}
        # rows -> the first step after the current re-timing of plain decoding (PLAIN_BURST)
        self._plain_until: dict[int, int] = {}
        # timings recorded so far, and the step costs computed at that count (_step_costs)
        self._timings_seen = 0
        self._cost_cache: dict[tuple, tuple[int, list[float | None]]] = {}

    # -- estimates ----------------------------------------------------------------------
    def alphas(self, source: str, k: int) -> list[float]:
        """[alpha_1, ..., alpha_k]: the chance that draft j of ``source`` is kept given the
        drafts before it were (Beta(1, 1) prior; unreached positions: the deepest reached)."""
        reached, kept = self.reached.get(source, []), self.kept.get(source, [])
        out: list[float] = []
        for j in range(k):
            if j < len(reached) and reached[j] > 0:
                out.append((kept[j] + 1.0) / (reached[j] + 2.0))
            else:
                out.append(out[-1] if out else 0.5)
        return out

    def judged(self, source: str) -> float:
        """The (discounted) rows whose first draft of ``source`` was verified."""
        reached = self.reached.get(source)
        return reached[0] if reached else 0.0

    def expected_tokens(self, k: int, alphas: list[float]) -> float:
        """1 + a_1 + a_1 a_2 + ... + a_1...a_k: tokens a row gets from a step with k drafts."""
        total, chain = 1.0, 1.0
        for a in alphas[:k]:
            chain *= a
            total += chain
        return total

    def step_cost(self, rows: int, k: int, passes: str = "per_token",
                  source: str = "exit") -> float | None:
        """Estimated seconds of a step with k drafts at ``rows`` active rows (None: not yet
        timed). passes: the draft passes the step runs -- "per_token" (the exit head drafts:
        k + 1 passes below the exit), "one" (drafts known up front, one pass below the exit),
        "none", or "per_draft" (a proposer that runs a draft model: k of ``source``'s passes,
        timed by :meth:`record_proposal`)."""
        c = self.costs.get(rows)
        if c is None:
            return None
        verify = c.verify_cost(self.verified_positions(k, passes))
        if verify is None:
            return None
        if passes == "per_draft":
            if not k:
                return verify
            per = c.proposal.get(source)
            return None if per is None else k * per + verify
        if passes == "one":  # one pass of the k + 1 positions below the exit
            fed = c.pass_cost(k + 1)
            return None if fed is None else fed + verify
        if passes == "per_token" and not k and c.unit() is not None:
            return c.unit() + verify  # a plain step's pass below the exit runs no head
        n = {"per_token": k + 1, "none": 0}[passes]
        if n and c.draft is None:
            return None
        return n * (c.draft or 0.0) + verify

    def verified_positions(self, k: int, passes: str) -> int:
        """Positions a step with k drafts verifies: 1 + k, or with token trees (drafts of
        the exit head or of a draft model) 1 + k * tree_width, rounded."""
        width = self.tree_width if passes in ("per_token", "per_draft") else 1.0
        return 1 + round(k * width)

    def record_tree(self, k: int, q: int) -> None:
        """A tree step verified q positions for k >= 1 drafts: move ``tree_width`` toward
        (q - 1) / k (smoothed by TREE_SMOOTHING; a fixed width stays where it is)."""
        self.tree_width += (1.0 - TREE_SMOOTHING) * ((q - 1) / k - self.tree_width)

    def _step_costs(self, rows: int, passes: str, source: str) -> list[float | None]:
        """[step_cost(rows, k, passes, source) for k in 0..max_len], computed once per set
        of timings: the sources of one step (the exit, each n-gram level) share them."""
        key = (rows, passes, source if passes == "per_draft" else None)
        known = self._cost_cache.get(key)
        stamp = (self._timings_seen, self.tree_width)
        if known is None or known[0] != stamp:
            known = (stamp,
                     [self.step_cost(rows, n, passes, source) for n in range(self.max_len + 1)])
            self._cost_cache[key] = known
        return known[1]

    # -- decisions ----------------------------------------------------------------------
    def begin_step(self) -> None:
        """Count a decoding step (exploration is scheduled by steps)."""
        self.steps += 1

    def choose(self, rows: int, source: str = "exit", passes: str = "per_token") -> int:
        """The draft length for drafts of ``source`` in the next step of a batch of ``rows``
        active rows (``passes`` as in :meth:`step_cost`)."""
        c = self.costs.get(rows)
        longer = c is not None and any(q > 1 for q in c.verify)
        self.rates.pop(source, None)
        if self._plain_until.get(rows, 0) > self.steps:  # plain decoding being re-timed
            return self._chosen(source, 0)
        if (c is None or not longer or 1 not in c.verify
                or self.step_cost(rows, 1, passes, source) is None):
            # Time a one-token draft first, then k = 0 (plain decoding); longer drafts are
            # costed along the line through those two until tried.
            k = 0 if longer and 1 not in c.verify else 1
        else:
            alphas = self.alphas(source, self.max_len)
            rates = [self.expected_tokens(n, alphas) / max(cost or 0.0, 1e-12)
                     for n, cost in enumerate(self._step_costs(rows, passes, source))]
            k = max(range(self.max_len + 1), key=rates.__getitem__)
            clock = bool(k) and self.clock_prefers_plain(rows)
            if clock:
                k = 0  # the model favours drafting, the clock does not
            if k == 0 and self.judged(source) < ACCEPT_MIN:
                # too few drafts judged to say they are not kept: the first few may all be
                # rejected by chance (on a cold step too), and plain decoding would then rest
                # for 8 x explore_every steps on that. Draft one token until ACCEPT_MIN rows
                # have reached position 1, as a length is timed WARM times before it is
                # outvoted (a drafter that does not pay costs that many drafting steps once)
                k, clock = 1, False
            self.rates[source] = rates[k]
            # Rest (plain steps until the next exploring step) only when plain decoding won
            # clearly; after a close call the next step chooses again, so that noise in the
            # estimates cannot switch drafting off for explore_every steps at a time.
            clear = clock or rates[0] >= (1 + self.explore_margin) * max(rates[1:])
            if k == 0 and clear:
                self._zero_since[(rows, source)] = self.steps  # plain decoding won
            else:
                self._zero_since.pop((rows, source), None)
            every = self.explore_every
            if every and k > 0 and self.steps % (8 * every) == every:
                # re-time plain decoding, the baseline, for long enough that the clock can
                # compare its realized rate with drafting's (clock_prefers_plain)
                self._plain_until[rows] = self.steps + PLAIN_BURST
                k = 0
            elif every and self.steps % every == 0:
                # a neighbour of the best length, up and down in turn, when it is close
                up = k == 0 or (k < self.max_len and self.steps % (2 * every))
                near = k + 1 if up else k - 1
                # a length timed fewer than WARM times (or window) is tried whatever its estimate:
                # its first timing may be a cold one (first use of a shape, a kernel choice
                # being timed), and a median outvotes such a timing only from three on
                cold = c.timed(self.verified_positions(near, passes))
                close = (rates[near] >= (1 - self.explore_margin) * rates[k]
                         or (near > 0 and cold < min(WARM, self.window)))
                if close or self.steps % (8 * every) == 0:
                    k = near
        return self._chosen(source, k)

    def _chosen(self, source: str, k: int) -> int:
        """Record ``source``'s chosen length k (for inspection) and return it."""
        history = self.history.setdefault(source, [])
        history.append(k)
        if len(history) > 2 * HISTORY:  # a controller lives as long as its model: stay bounded
            del history[:-HISTORY]
        return k

    def resting(self, rows: int, sources: Sequence[str]) -> bool:
        """True when, for every source, plain decoding (k = 0) won the last choice at this
        batch size clearly (see :meth:`choose`) and this step is not one of the
        every-``explore_every`` steps that choose (and may try a neighbour): the decoder then
        runs a plain step without timing or choosing anything, so that when speculation does
        not pay it costs what plain decoding costs."""
        if not sources or (self.explore_every and self.steps % self.explore_every == 0):
            return False
        return all((rows, source) in self._zero_since for source in sources)

    def realized_rate(self, rows: int, drafting: bool) -> float | None:
        """Tokens per second that whole steps (drafting or plain) realized at ``rows`` active
        rows (discounted; None while the discounted count of such steps is below
        ``REALIZED_MIN``)."""
        r = self.realized.get((rows, drafting))
        if r is None or r[2] < REALIZED_MIN or r[1] <= 0:
            return None
        return r[0] / r[1]

    def clock_prefers_plain(self, rows: int) -> bool:
        """True when drafting steps realized fewer tokens per second than plain ones, by more
        than ``CLOCK_MARGIN`` (a closer race is left to the model: both sides are noisy)."""
        spec, plain = self.realized_rate(rows, True), self.realized_rate(rows, False)
        return spec is not None and plain is not None and spec < (1 - CLOCK_MARGIN) * plain

    def prefers(self, source: str, other: str) -> bool:
        """Whether ``source``'s last choice promised at least ``other``'s tokens per second
        (True while either is still being explored, so both keep being measured)."""
        if source not in self.rates or other not in self.rates:
            return True
        return self.rates[source] >= self.rates[other]

    # -- measurements -------------------------------------------------------------------
    def record_costs(self, rows: int, q: int, verify_s: float, draft_s: float | None,
                     draft_passes: int, unit_s: float | None = None,
                     positions: int = 1) -> None:
        """Timings of one step at ``rows`` active rows: verifying q positions took
        ``verify_s``; ``draft_passes`` draft passes of ``positions`` positions each took
        ``draft_s`` in all; ``unit_s``: one pass of the blocks below the exit for one
        position, without the exit head, timed in this step (default: ``draft_s`` of a
        step with one one-position pass, right for plain steps, whose draft phase is that
        pass alone).

        With such a pass timed, verifying is kept as a multiple of it (see the module
        docstring: a shared machine's slow phases slow both alike, so lengths timed in
        different phases stay comparable), and every verification cost is that multiple
        times the current unit (the median of its latest timings); without one, in seconds.
        The unit must not include the head: plain steps run none, so a unit with it would
        make the lengths that draft look cheaper than plain steps by the head's share.

        A step whose drafts were known up front feeds them in one pass of ``positions`` =
        k + 1 positions: that pass is no unit (it costs more than one position's) and no
        per-position draft pass; it is kept as its own multiple of the current unit
        (:meth:`_Costs.pass_cost`), so that long drafts of that kind are not costed as if
        their pass were one position's."""
        self._timings_seen += 1
        c = self.costs.setdefault(rows, _Costs(self.window))
        timed = draft_s is not None and draft_passes > 0
        if timed and positions > 1:
            current = c.unit()
            if current is not None and current > 0 and draft_s > 0:
                c.passes[positions] = c.add(("pass", positions),
                                            draft_s / draft_passes / current)
            unit = None
        else:
            per = draft_s / draft_passes if timed else None
            if per is not None and q > 1:  # a plain step's pass (q = 1) runs no exit head:
                c.draft = c.add("draft", per)  # it times the unit, not a draft pass
            unit = unit_s if unit_s is not None else per
        if unit is not None and unit > 0:
            current = c.add("unit", unit)
            c.ratio[q] = c.add(("ratio", q), verify_s / unit)
            c.verify = {n: r * current for n, r in c.ratio.items()}
        elif c.ratio:  # a step without a unit pass: in the current unit
            current = c.timings["unit"].value
            c.ratio[q] = c.add(("ratio", q), verify_s / current)
            c.verify[q] = c.ratio[q] * current
        else:
            c.verify[q] = c.add(("verify", q), verify_s)

    def record_step(self, rows: int, drafting: bool, tokens: int, seconds: float) -> None:
        """A whole step at ``rows`` active rows (drafting: k > 0 for some row) emitted
        ``tokens`` tokens in all in ``seconds``.

        Every step discounts the evidence of *both* kinds at this batch size (a kind's rate,
        tokens over seconds, is unchanged by it; only its weight shrinks): evidence of a kind
        the decoder has stopped running expires, instead of vetoing it for as long as it is
        not re-run -- a run of rejected drafts in a hard passage would otherwise keep
        drafting off for the rest of the text."""
        for kind in (True, False):
            r = self.realized.get((rows, kind))
            if r is not None:
                r[0] *= REALIZED_DISCOUNT
                r[1] *= REALIZED_DISCOUNT
                r[2] *= REALIZED_DISCOUNT
        r = self.realized.setdefault((rows, drafting), [0.0, 0.0, 0.0])
        r[0] += tokens
        r[1] += seconds
        r[2] += 1.0

    def record_proposal(self, rows: int, source: str, seconds: float, drafts: int) -> None:
        """A proposer of ``source`` took ``seconds`` to propose up to ``drafts`` tokens per row
        at ``rows`` active rows."""
        self._timings_seen += 1
        c = self.costs.setdefault(rows, _Costs(self.window))
        c.proposal[source] = c.add(("proposal", source), seconds / max(drafts, 1))

    def record_acceptance(self, source: str, accepted: list[int], drafted: list[int]) -> None:
        """A step's outcome for ``source``: per row, drafts kept (the longest verified
        prefix) and drafts proposed. A row with n kept of k reached positions 1..min(n+1, k)
        and kept positions 1..n."""
        d = self.discount
        reached = [x * d for x in self.reached.get(source, [])]
        kept = [x * d for x in self.kept.get(source, [])]
        for n, k in zip(accepted, drafted):
            top = min(n + 1, k)
            while len(reached) < top:
                reached.append(0.0)
                kept.append(0.0)
            for j in range(top):
                reached[j] += 1.0
                if j < n:
                    kept[j] += 1.0
        self.reached[source], self.kept[source] = reached, kept

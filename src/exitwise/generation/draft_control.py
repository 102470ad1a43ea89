"""The draft length of each speculative step, chosen from measured costs and acceptance.

Speculation pays only when the tokens a step yields outweigh what drafting and verifying
cost; both sides depend on the machine, the model, the batch size and the text. A fixed
draft length that wins at batch 1 can lose at batch 4 (verifying k + 1 tokens of several rows
is no longer almost free), so ``draft_len="auto"`` decides per step instead, from what the
run itself has measured:

- **cost**: the wall-clock time of one draft pass (blocks below the exit and the exit head,
  per drafted position) and of verifying q = k + 1 positions, each a running mean per active
  batch size; a verification length not yet timed is interpolated linearly between the
  nearest timed ones (extrapolated flat beyond them);
- **acceptance**: each source of drafts (the exit head, n-gram lookups) keeps a discounted
  count of kept drafts and of rejections; under the usual geometric model (each further
  draft kept with probability alpha until the first rejection) alpha = kept / (kept +
  rejections), started from a Beta(1, 1) prior.

A row drafting k tokens then yields E[tokens] = 1 + alpha + ... + alpha^k per step, and the
step costs T(k) = (k + 1) * t_draft + t_verify(k + 1) when the exit head drafts (the pending
token and each draft pass through the blocks below the exit), one pass or none when the
drafts are known up front (n-gram lookups); the controller picks the k in 0..max_len with the
most tokens per second. k = 0 is plain greedy decoding through the same path, so when
speculation does not pay the decoder falls back to it by measurement, never by a constant.
Until both a one-token draft and k = 0 are timed for the current batch size, it tries those
two (one step each; longer drafts are costed along the line through them until tried); then
every ``explore_every``-th step it tries a neighbour of the best k, so the estimates follow the
machine and the text as they drift. With n-gram and exit drafts together, a row uses its
n-gram continuation only while n-gram drafts promise at least the exit's tokens per second
(:meth:`DraftLengthController.prefers`). The decoding strategies keep one controller per model
and drafter (and thread count, kernels, device), so what one ``generate`` call measured carries
over to the next: the calibration happens at first use.

Which k is chosen never changes what is generated (every draft is verified), only how fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class _Costs:
    """Running means of one active batch size's step costs (seconds)."""

    draft: float | None = None
    verify: dict[int, float] = field(default_factory=dict)  # q -> seconds

    def verify_cost(self, q: int) -> float | None:
        """Seconds to verify q positions: timed, else interpolated linearly between the
        nearest timed lengths, else extrapolated along the last two (never decreasing)."""
        if q in self.verify:
            return self.verify[q]
        known = sorted(self.verify)
        if not known:
            return None
        below = [x for x in known if x < q]
        above = [x for x in known if x > q]
        if below and above:
            lo, hi = below[-1], above[0]
            w = (q - lo) / (hi - lo)
            return (1 - w) * self.verify[lo] + w * self.verify[hi]
        if len(known) < 2:
            return self.verify[known[0]]
        lo, hi = (known[-2], known[-1]) if below else (known[0], known[1])
        slope = max(0.0, (self.verify[hi] - self.verify[lo]) / (hi - lo))
        edge = hi if below else lo
        return max(0.0, self.verify[edge] + slope * (q - edge))


class DraftLengthController:
    """Chooses each step's draft length; see the module docstring.

    max_len: the longest draft considered (>= 1). explore_every: steps between tries of a
    neighbour of the best length (0: never). smoothing: weight of a new timing in the running
    means. discount: how much of the past acceptance counts survive each update (forgetting
    lets the estimate follow the text).
    """

    def __init__(self, max_len: int = 8, explore_every: int = 16, smoothing: float = 0.2,
                 discount: float = 0.98) -> None:
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ConfigError(f"the longest automatic draft must be an int >= 1; got {max_len!r}")
        if not 0.0 < smoothing <= 1.0 or not 0.0 < discount <= 1.0:
            raise ConfigError("smoothing and discount must lie in (0, 1]")
        self.max_len = max_len
        self.explore_every = explore_every
        self.smoothing = smoothing
        self.discount = discount
        self.costs: dict[int, _Costs] = {}
        self.kept: dict[str, float] = {}
        self.rejected: dict[str, float] = {}
        self.steps = 0
        self.history: dict[str, list[int]] = {}  # chosen lengths per source, for inspection
        # expected tokens per second of the last choice per source (absent while exploring)
        self.rates: dict[str, float] = {}

    # -- estimates ----------------------------------------------------------------------
    def alpha(self, source: str) -> float:
        """Probability that a further draft of ``source`` is kept (Beta(1, 1) prior)."""
        return (self.kept.get(source, 0.0) + 1.0) / (
            self.kept.get(source, 0.0) + self.rejected.get(source, 0.0) + 2.0)

    def expected_tokens(self, k: int, alpha: float) -> float:
        """1 + alpha + ... + alpha^k: tokens a row gets from a step with k drafts."""
        return sum(alpha ** i for i in range(k + 1))

    def step_cost(self, rows: int, k: int, passes: str = "per_token") -> float | None:
        """Estimated seconds of a step with k drafts at ``rows`` active rows (None: not yet
        timed). passes: the draft passes the step runs below the exit -- "per_token" (the
        exit head drafts: k + 1), "one" (drafts known up front, one pass) or "none"."""
        c = self.costs.get(rows)
        if c is None:
            return None
        verify = c.verify_cost(k + 1)
        n = {"per_token": k + 1, "one": 1, "none": 0}[passes]
        if verify is None or (n and c.draft is None):
            return None
        return n * (c.draft or 0.0) + verify

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
        if c is None or not longer or 1 not in c.verify or self.step_cost(rows, 1, passes) is None:
            # Time a one-token draft first, then k = 0 (plain decoding); longer drafts are
            # costed along the line through those two until tried.
            k = 0 if longer and 1 not in c.verify else 1
        else:
            alpha = self.alpha(source)
            rates = []
            for n in range(self.max_len + 1):
                cost = self.step_cost(rows, n, passes)
                rates.append(self.expected_tokens(n, alpha) / max(cost or 0.0, 1e-12))
            k = max(range(self.max_len + 1), key=rates.__getitem__)
            self.rates[source] = rates[k]
            if self.explore_every and self.steps % self.explore_every == 0:
                # a neighbour of the best length, up and down in turn
                up = k == 0 or (k < self.max_len and self.steps % (2 * self.explore_every))
                k = k + 1 if up else k - 1
        self.history.setdefault(source, []).append(k)
        return k

    def prefers(self, source: str, other: str) -> bool:
        """Whether ``source``'s last choice promised at least ``other``'s tokens per second
        (True while either is still being explored, so both keep being measured)."""
        if source not in self.rates or other not in self.rates:
            return True
        return self.rates[source] >= self.rates[other]

    # -- measurements -------------------------------------------------------------------
    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def record_costs(self, rows: int, q: int, verify_s: float, draft_s: float | None,
                     draft_passes: int) -> None:
        """Timings of one step at ``rows`` active rows: verifying q positions took
        ``verify_s``; ``draft_passes`` draft passes took ``draft_s`` in all."""
        c = self.costs.setdefault(rows, _Costs())
        c.verify[q] = self._mean(c.verify.get(q), verify_s)
        if draft_s is not None and draft_passes > 0:
            c.draft = self._mean(c.draft, draft_s / draft_passes)

    def record_acceptance(self, source: str, kept: int, rejections: int) -> None:
        """A step's outcome for ``source``: drafts kept, and rows whose draft met a rejection."""
        d = self.discount
        self.kept[source] = d * self.kept.get(source, 0.0) + kept
        self.rejected[source] = d * self.rejected.get(source, 0.0) + rejections

"""SWIFT: choosing the skipped blocks on the fly, while decoding (Xia et al., 2024, "SWIFT:
On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration", Sec. 4.1 "context-based
layer set optimization").

Draft & Verify (:mod:`.layer_skip`) chooses the blocks a self-draft leaves out offline; SWIFT
chooses them during decoding, from the text being generated, with no offline step and no
training. The drafts themselves are :class:`~.layer_skip.LayerSkipDrafter`'s: the model
without the skipped blocks, verified by every block, so the output is exactly greedy
decoding's (or, sampling, its distribution) whatever set is in use.

The search (:class:`SwiftSearch`, one object kept per model so that it continues across
``generate`` calls, as the reference keeps its statistics across the prompts of a task):

- the candidates are the attention and the MLP sub-layers of blocks 1..L-2 (never the first
  or last block), 2 (L - 2) of them; the drafter starts by skipping both sub-layers of every
  other block (1, 3, 5, ...), as the reference;
- once a row has generated more than ``context_window + 1`` tokens, every ``opt_interval``-th
  decoding step (speculative or, when the controller rests, plain) runs one iteration: a
  candidate set of ``int(2 (L - 2) * skip_ratio)`` sub-layers, drawn at random, or every
  ``bayes_interval``-th iteration suggested by Bayesian optimisation (:func:`bayes_suggest`:
  a Gaussian process over the sets scored so far, UCB acquisition);
- the candidate's *matchness* (:func:`window_matchness`): the first ``context_window + 1``
  generated tokens are fed at once, teacher-forced, through the kept sub-layers only, attending
  to the full model's keys/values of the prompt; the share of the ``context_window`` next-token
  predictions equal to the generated tokens;
- the candidate becomes the drafter's set if it scores above the best so far; the search stops
  when a score exceeds ``max_score``, after ``max_tolerance_iter`` iterations in a row without
  improvement, or after ``max_opt_iter`` iterations.

Reference read: the authors' code (hemingkx/SWIFT): ``model/swift/utils.py``
(``swift_optimization``, ``layer_random_search``, ``layer_bayes_search``) and
``evaluation_llama/inference_swift.py`` (``swift_forward``: one optimisation per decoding step
once ``new_token_num > context_window + 1``; defaults skip_ratio 0.45, opt_interval 1,
bayes_interval 25, max_opt_iter 1000, max_tolerance_iter 300, max_score 0.95,
context_window 32; ``BayesianOptimization`` with ``alpha=1e-2`` and a UCB utility, kappa 2.5).
The defaults here are the reference's. Deviations:

- the reference edits its Llama modelling code to skip either sub-layer; here every decoder
  family's sub-layers run as its own block runs them
  (:meth:`~exitwise.backbones.HFDecoderBackbone.run_part`), and ``sublayers=False`` searches
  whole blocks instead (``int((L - 2) * skip_ratio)`` of them);
- SWIFT's confidence-aware inference (Sec. 4.2) is built as options, not defaults: its
  early-stopped drafting is ``draft_len=25, draft_threshold=0.8`` (a fixed threshold; "auto"
  adapts it as Draft & Verify does) and its dynamic verification is
  ``tree_width="confidence"`` (token trees of the draft's next choices, the reference's
  widths per depth; :mod:`.token_tree` states its deviations); by default the draft length
  comes from the measured-cost controller (:mod:`.draft_control`, ``draft_len="auto"``) and
  drafts are chains: measured on a CPU (``benchmarks/lm_swift_trees.py``), the trees raised
  acceptance but their wider verification cost as much or more than they gave;
- the Gaussian process (Matern 5/2 kernel as ``bayes_opt``'s default, its length scale chosen
  by marginal likelihood on a grid instead of L-BFGS restarts) is maximised over 10,000 random
  points (``bayes_opt``'s warm-up) without the L-BFGS refinement, and it learns the 0/1 sets
  actually scored (the reference registers the continuous suggestion for Bayesian steps);
- a batch scores the candidate over every row that has generated enough (the reference runs
  batch 1); the scoring pass reuses the live cache with the generated slots masked out (the
  reference copies the prompt's cache), which gives the same attention;
- the time spent on the search is not counted as drafting time by the controller (it is
  counted in the wall-clock of every benchmark).

Shapes: A active rows, W = ``context_window``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..backbones.hf_decoder import DecodeContext
from ..errors import ConfigError
from .gaussian_process import WARMUP_POINTS, gp_posterior, ucb_argmax
from .layer_skip import (
    DraftThreshold,
    LayerSkipDrafter,
    SubLayer,
    check_skip,
    skip_point,
    skip_units,
)

__all__ = ["SwiftDrafter", "SwiftSearch", "bayes_suggest", "gp_posterior", "window_matchness"]

_UCB_KAPPA = 2.5  # the reference's UtilityFunction(kind="ucb", kappa=2.5)


@dataclass
class SwiftSearch:
    """State of SWIFT's on-the-fly search for one model (see the module docstring).

    skip: the set the drafter uses now, (block, part) pairs (:mod:`.layer_skip`); best_score:
    its matchness (0 before the first iteration, so the first candidate scored replaces the
    initial every-other-block set); observed: every (set, matchness) scored; active: False
    once a stopping rule fired. sublayers: candidates are sub-layers (the reference), else
    whole blocks.
    """

    num_layers: int
    skip_ratio: float = 0.45
    context_window: int = 32
    opt_interval: int = 1
    bayes_interval: int = 25
    max_opt_iter: int = 1000
    max_tolerance_iter: int = 300
    max_score: float = 0.95
    bayes: bool = True
    sublayers: bool = True
    seed: int = 0
    skip: list[SubLayer] = field(default_factory=list)
    best_score: float = 0.0
    opt_iter: int = 0
    tolerance_iter: int = 0
    steps: int = 0
    active: bool = True
    stopped_by: str | None = None
    observed: list[tuple[list[SubLayer], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_layers < 3:
            raise ConfigError("SWIFT skips blocks between the first and the last: the model "
                              f"needs at least 3 blocks; it has {self.num_layers}")
        if not 0.0 < float(self.skip_ratio) < 1.0:
            raise ConfigError(f"skip_ratio must be in (0, 1); got {self.skip_ratio!r}")
        for name in ("context_window", "opt_interval", "bayes_interval", "max_opt_iter",
                     "max_tolerance_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1; got {value!r}")
        if not isinstance(self.sublayers, bool):
            raise ConfigError(f"sublayers must be True or False; got {self.sublayers!r}")
        if not 0.0 < float(self.max_score) <= 1.0:
            raise ConfigError(f"max_score must be in (0, 1]; got {self.max_score!r}")
        self.skip = check_skip(self.skip or list(range(1, self.num_layers - 1, 2)),
                               self.num_layers)  # default: every other block, both parts
        self._rng = random.Random(self.seed)
        # a candidate unit: one sub-layer, or a whole block (both of its sub-layers)
        self._units = skip_units(self.num_layers, self.sublayers)

    @property
    def candidates(self) -> list[tuple[SubLayer, ...]]:
        """What may be skipped: each sub-layer of blocks 1 .. L - 2 (the attention ones first,
        as the reference's coordinates), or each of those blocks whole."""
        return list(self._units)

    @property
    def set_size(self) -> int:
        """Units in a candidate set: int(units * skip_ratio), at least 1."""
        return max(1, int(len(self._units) * self.skip_ratio))

    def due(self) -> bool:
        """Whether this decoding step runs an iteration (counts the steps it is asked)."""
        if not self.active:
            return False
        self.steps += 1
        return (self.steps - 1) % self.opt_interval == 0

    def candidate(self) -> list[SubLayer]:
        """The next set to score: Bayesian every ``bayes_interval``-th iteration (once two sets
        were scored), else drawn uniformly."""
        if self.bayes and (self.opt_iter + 1) % self.bayes_interval == 0 and \
                len(self.observed) >= 2:
            units = bayes_suggest(self.observed, self._units, self.set_size, self._rng)
        else:
            units = self._rng.sample(self._units, self.set_size)
        return sorted(sub for unit in units for sub in unit)

    def iterate(self, score_of: Callable[[list[SubLayer]], float | None]) -> bool:
        """One iteration: score a candidate with ``score_of`` (None: nothing to score yet, no
        iteration) and keep it if it beats the best so far. Returns whether ``skip`` changed."""
        cand = self.candidate()
        score = score_of(cand)
        if score is None:
            return False
        self.observed.append((cand, float(score)))
        changed = False
        if score > self.best_score:
            self.best_score, self.skip, self.tolerance_iter = float(score), cand, 0
            changed = True
            if score > self.max_score:
                self.active, self.stopped_by = False, "max_score"
        else:
            self.tolerance_iter += 1
        self.opt_iter += 1
        if self.active and self.tolerance_iter > self.max_tolerance_iter:
            self.active, self.stopped_by = False, "tolerance"
        if self.active and self.opt_iter > self.max_opt_iter:
            self.active, self.stopped_by = False, "max_opt_iter"
        return changed


def bayes_suggest(observed: list[tuple[list[Any], float]], units: Sequence[Any], size: int,
                  rng: random.Random) -> list[Any]:
    """Bayesian optimisation's next set: fit a GP to the scored sets (each a 0/1 vector over
    ``units``, a unit set to 1 when every element of it was skipped (a unit is a tuple of
    set elements, or an element itself); scores normalised to mean 0, std 1), take the point
    of [0, 1]^d with the highest UCB (mean + 2.5 std) among random ones, and return the units
    of its ``size`` largest coordinates (the reference's ``layer_bayes_search``)."""
    as_tuples = [unit if isinstance(unit, tuple) else (unit,) for unit in units]
    x = torch.tensor([skip_point(skip, as_tuples) for skip, _ in observed], dtype=torch.float64)
    y = torch.tensor([s for _, s in observed], dtype=torch.float64)
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    query = torch.rand(WARMUP_POINTS, len(units), generator=gen, dtype=torch.float64)
    best = query[ucb_argmax(x, y, query, _UCB_KAPPA)]
    top = torch.argsort(best, descending=True)[:size]
    return [units[int(i)] for i in sorted(int(i) for i in top)]


@torch.inference_mode()
def window_matchness(session: Any, drafter: LayerSkipDrafter, window: int) -> float | None:
    """SWIFT's score of ``drafter``'s current set on ``session``: over the rows that have
    generated more than ``window + 1`` tokens, the share of positions j < W where the model
    without the skipped sub-layers, fed the generated tokens 0..j after the prompt (the full
    model's prompt keys/values; the generated slots of the cache masked out), predicts
    generated token j + 1. None when no row has generated enough. The cache is left as found.
    """
    rows = session.rows.tolist()
    w = window + 1
    ready = [len(session.generated[r]) > w for r in rows]
    if not any(ready):
        return None
    bb = session.backbone
    device = session.mask.device
    t = session.prompt.shape[1]
    a, s = session.mask.shape
    ids = torch.tensor([session.generated[r][:w] if ok else [0] * w
                        for r, ok in zip(rows, ready)], dtype=torch.long, device=device)
    prompt_mask = session.mask[:, :t]
    positions = prompt_mask.sum(1, keepdim=True) + torch.arange(w, device=device)  # (A, W+1)
    mask = torch.cat([prompt_mask, torch.zeros(a, s - t, dtype=prompt_mask.dtype, device=device),
                      torch.ones(a, w, dtype=prompt_mask.dtype, device=device)], 1)
    slot_pos = torch.cat([session.slot_pos, positions], 1)
    ctx = DecodeContext(session.cache, positions, mask, slot_pos)
    hidden = drafter.run(bb, bb.embed(ids, positions), ctx)
    session.stats.draft_sublayer_applications += a * w * drafter.sublayers_run
    for i in drafter.attends:  # the scoring pass's slots go again
        session.cache.layers[i].crop(-w)
    pred = bb.lm_logits(bb.final_norm(hidden[:, :-1])).argmax(-1)  # (A, W)
    keep = torch.tensor(ready, device=device)
    hits = (pred == ids[:, 1:])[keep]
    return float(hits.double().mean())


class SwiftDrafter(LayerSkipDrafter):
    """:class:`~.layer_skip.LayerSkipDrafter` whose skipped set follows a :class:`SwiftSearch`:
    before each decoding step (:meth:`prepare`, outside the measured drafting time), one
    search iteration when it is due."""

    def __init__(self, search: SwiftSearch, threshold: DraftThreshold | None = None,
                 tree: int | str = 1, sampling: bool = False) -> None:
        self.search = search
        super().__init__(search.skip, search.num_layers, threshold, tree, sampling)

    def prepare(self, session: Any) -> None:
        search = self.search
        if not search.active:
            return
        enough = search.context_window + 1
        if not any(len(session.generated[r]) > enough for r in session.rows.tolist()):
            return  # the reference starts once new_token_num > context_window + 1
        if not search.due():
            return
        current = list(self.skip)

        def score_of(cand: list[SubLayer]) -> float | None:
            self.set_skip(cand)
            try:
                return window_matchness(session, self, search.context_window)
            finally:
                self.set_skip(current)

        if search.iterate(score_of):
            self.set_skip(search.skip)

"""Draft & Verify's offline search as the paper runs it: Bayesian optimisation of the skipped
sub-layers, each candidate set scored by timing real decoding with it.

Draft & Verify (Zhang et al., ACL 2024, Sec. 3.2 "Selection of skipped layers") treats the
choice of the attention and MLP sub-layers a draft leaves out as a black-box optimisation of
the measured decoding speed. :func:`~.layer_skip.search_skip_layers` is exitwise's cheaper
stand-in (greedy selection on a modelled objective, no clock); this module is the paper's
mechanism, for users who can afford a search of many timed evaluations:

- one variable x_u in [0, 1] per unit u (the attention and the MLP of each block 1..L-2, or
  with ``sublayers=False`` each such block whole); the candidate set skips the units with
  x_u > 0.5 (:func:`point_skip`);
- a candidate's score is the tokens per second of lossless ``layer_skip`` decoding with it:
  the calibration prompts decoded one at a time (batch 1), ``max_new_tokens`` each, tokens
  decoded over the wall-clock seconds of the ``generate`` calls (:func:`time_decoding`);
- the points scored are first ``probes`` (sets the user expects to be good, as the
  reference's ``probe``), then ``init_points`` uniform random points, then ``n_iter`` points
  chosen by Bayesian optimisation: a Gaussian process fitted to the points and scores so far,
  and the point with the highest upper confidence bound (mean + 2.576 std, ``bayes_opt``'s
  default kappa) among random points of [0, 1]^d and neighbours of the best point
  (:func:`next_point`; :mod:`.gaussian_process`);
- the fastest set is then timed again against plain greedy decoding, interleaved, ``confirm``
  times; the result's ``skip`` is that set when its median beats greedy's, else empty.

Reference read: the authors' code (dilab-zju/self-speculative-decoding), ``searching.py``
(``LayerSkippingSearching``: 2L variables in [0, 1] over ``attn_skip_layer_id_set`` and
``mlp_skip_layer_id_set``, each skipped above 0.5; ``_black_box_evaluate_function`` returns
``max_new_tokens`` x prompts over the summed ``infer`` times of ``exact_self_speculative_
generate`` with 32 new tokens; ``BayesianOptimization(random_state=1)`` with
``set_gp_params(alpha=1e-2)``, ``probe(..., lazy=True)`` for good points and
``maximize(init_points=0, n_iter=1000)``). Deviations:

- the first and last blocks are always kept (as everywhere in exitwise's layer skipping);
- ``n_iter`` defaults to 48, not 1,000: on a CPU one evaluation of a 135M model takes
  seconds, not the fraction of a second a GPU needs; raise it for a longer search;
- without ``probes`` the search probes every 8th, 4th and 2nd block skipped whole (sets of
  about 1/8, 1/4 and 1/2 of the units; the reference leaves probing to its user), and
  ``init_points`` defaults to 0 as the reference's call;
- a point with no coordinate above 0.5 names no set (``layer_skip`` needs one): it is not
  decoded and scores the lowest score so far;
- the acquisition is maximised over ``bayes_opt``'s 10,000 random points plus 1,000
  neighbours of the best point so far (one to three coordinates moved across 0.5), instead of
  ``bayes_opt``'s L-BFGS refinement from random starts: in 2(L - 2) dimensions uniform random
  points almost all skip about half the units, and the neighbours let the search refine a
  good sparse set;
- the tokens counted are the tokens decoded (an answer that ends early counts what it
  produced), not ``max_new_tokens`` per prompt;
- evaluations decode as the reference does by default: drafts of at most 8, each row's
  draft stopped on its confidence by the reference's adaptive threshold (``draft_len=8``,
  ``draft_threshold="auto"``, :class:`~.layer_skip.DraftThreshold`). exitwise's usual
  ``draft_len="auto"`` would make a poor objective: its controller falls back to plain
  decoding wherever drafting does not pay, so most sets would score about greedy's speed
  and the search would fit timing noise;
- the plain-greedy baseline, the confirmation and ``checkpoint`` (every evaluation written to
  a JSON file; a search started on an existing one goes on from it) are additions.

Scores are wall-clock measurements: on a busy machine they are noisy, which the GP's
``alpha`` absorbs in part; the confirmation's medians, not the search's single timings, say
whether the chosen set pays.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from .gaussian_process import WARMUP_POINTS, ucb_argmax
from .layer_skip import SubLayer, check_skip, skip_point, skip_spec, skip_units

UCB_KAPPA = 2.576  # bayes_opt's default upper-confidence-bound kappa
NEIGHBOURS = 1_000  # neighbours of the best point added to the acquisition's random points
CHECKPOINT_FORMAT = "exitwise.skip_bayes/1"


@dataclass
class TimedSkipSearch:
    """What :func:`bayes_search_skip_layers` found.

    skip: the fastest set ({"attn": blocks, "mlp": blocks}) when its confirmation median beat
    plain greedy decoding's, else empty. fastest: the fastest set of the search, whether or
    not it pays. tokens_per_s / greedy_tokens_per_s: their medians over the confirmation's
    interleaved repetitions; speedup_vs_greedy: their ratio. history: every evaluation
    (``x``, ``skip``, ``how`` = "probe" | "random" | "bayes", ``tokens``, ``seconds``,
    ``tokens_per_s``). confirmation: the per-repetition tokens/s of both."""

    skip: dict[str, list[int]]
    fastest: dict[str, list[int]]
    tokens_per_s: float
    greedy_tokens_per_s: float
    speedup_vs_greedy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    confirmation: dict[str, list[float]] = field(default_factory=dict)


def point_skip(x: Sequence[float], units: Sequence[tuple[SubLayer, ...]]) -> list[SubLayer]:
    """The sub-layers of the units whose coordinate is above 0.5 (the reference's rule),
    sorted. x: (d,), one coordinate per unit."""
    if len(x) != len(units):
        raise ConfigError(f"a point has one coordinate per unit ({len(units)}); got {len(x)}")
    return sorted(sub for v, unit in zip(x, units) if v > 0.5 for sub in unit)


def default_probes(num_layers: int) -> list[list[int]]:
    """Every 8th, 4th and 2nd of blocks 1..L-2, skipped whole (distinct, non-empty sets)."""
    out: list[list[int]] = []
    for step in (8, 4, 2):
        blocks = list(range(1, num_layers - 1, step))
        if blocks and blocks not in out:
            out.append(blocks)
    return out


def next_point(xs: torch.Tensor, ys: torch.Tensor, rng: random.Random,
               kappa: float = UCB_KAPPA) -> list[float]:
    """Bayesian optimisation's next point: the highest upper confidence bound of a GP fitted
    to the scored points xs (n, d) and scores ys (n,), among ``WARMUP_POINTS`` uniform random
    points of [0, 1]^d and ``NEIGHBOURS`` copies of the best point with one to three
    coordinates moved across 0.5 (v -> 1 - v)."""
    d = xs.shape[1]
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    uniform = torch.rand(WARMUP_POINTS, d, generator=gen, dtype=torch.float64)
    near = xs[int(torch.argmax(ys))].repeat(NEIGHBOURS, 1)
    for row in range(NEIGHBOURS):
        for col in rng.sample(range(d), min(d, rng.randint(1, 3))):
            near[row, col] = 1.0 - near[row, col]
    query = torch.cat([uniform, near])
    return query[ucb_argmax(xs, ys, query, kappa)].tolist()


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each prompt alone, (1, T_r), its padding removed."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ConfigError("input_ids must be a (B, T) batch of at least one prompt")
    if attention_mask is None:
        return [row[None] for row in input_ids]
    if attention_mask.shape != input_ids.shape:
        raise ConfigError("attention_mask must have input_ids' shape")
    rows = [row[m.bool()][None] for row, m in zip(input_ids, attention_mask)]
    if any(r.shape[1] == 0 for r in rows):
        raise ConfigError("every prompt needs at least one real token")
    return rows


def time_decoding(model: Any, rows: Sequence[torch.Tensor], timer: Callable[[], float],
                  **options: Any) -> tuple[int, float]:
    """Decode each prompt (1, T_r) alone with ``generate(model, row, **options)``; returns
    (tokens decoded, wall-clock seconds of the generate calls), summed over the prompts."""
    from .api import generate

    tokens, seconds = 0, 0.0
    for row in rows:
        start = timer()
        out = generate(model, row, **options)
        seconds += timer() - start
        tokens += sum(out.stats.new_tokens)
    return tokens, seconds


def _load(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluations of a checkpoint written with the same ``meta`` (else an error)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the search checkpoint {path}: {err}") from err
    if data.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    other = {k: data.get(k) for k in meta}
    if other != meta:
        raise ConfigError(f"{path} was written by another search ({other}); this one is {meta}")
    return list(data["evaluations"])


def _save(path: Path, meta: dict[str, Any], evaluations: list[dict[str, Any]]) -> None:
    """Write the checkpoint whole, then move it into place (an interruption leaves the
    previous one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": CHECKPOINT_FORMAT, **meta,
                               "evaluations": evaluations}, indent=1))
    os.replace(tmp, path)


def bayes_search_skip_layers(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32, n_iter: int = 48, init_points: int = 0,
    probes: Sequence[Any] | None = None, sublayers: bool = True, draft_len: int | str = 8,
    draft_threshold: float | str | None = "auto", confirm: int = 3, seed: int = 1,
    checkpoint: str | Path | None = None, progress: bool = True,
    timer: Callable[[], float] = time.perf_counter,
    **generate_options: Any,
) -> TimedSkipSearch:
    """Choose the sub-layers a ``layer_skip`` draft leaves out by Bayesian optimisation of the
    measured decoding speed (see the module docstring).

    input_ids, attention_mask: (B, T) calibration prompts (never the evaluation's), each
    decoded alone. max_new_tokens: tokens per prompt and evaluation (the reference's 32).
    n_iter: points chosen by Bayesian optimisation; init_points: uniform random points before
    them; probes: skip sets scored first (any form ``layer_skip`` accepts; default
    :func:`default_probes`). sublayers: one variable per attention and MLP sub-layer (the
    reference) or per block. draft_len, draft_threshold: how ``layer_skip`` drafts while a
    set is scored and confirmed (default: the reference's adaptive draft exiting). confirm:
    interleaved
    repetitions timing the fastest set against plain greedy decoding (>= 1). seed: the random
    source of the search. checkpoint: a JSON file to which every evaluation is written; when
    it exists the search goes on from it (it must come from the same kind of search).
    progress: a progress bar. timer: the clock (seconds). generate_options: passed to every
    ``generate`` call (e.g. ``kernels``, ``max_draft_len``).
    """
    from tqdm.auto import tqdm

    from ..backbones import decoder_of

    backbone, _ = decoder_of(model, "bayes_search_skip_layers")
    num_layers = backbone.num_layers
    if num_layers < 3:
        raise ConfigError("skipping needs a model of at least 3 blocks (the first and the last "
                          "are always kept)")
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("n_iter", n_iter, 0),
                             ("init_points", init_points, 0), ("confirm", confirm, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}; got {value!r}")
    units = skip_units(num_layers, sublayers)
    rows = _rows(input_ids, attention_mask)
    probe_sets = [check_skip(p, num_layers) for p in
                  (default_probes(num_layers) if probes is None else probes)]
    schedule: list[tuple[str, list[float] | None]] = (
        [("probe", skip_point(p, units)) for p in probe_sets]
        + [("random", None)] * init_points + [("bayes", None)] * n_iter)
    if not schedule:
        raise ConfigError("nothing to search: give probes, init_points or n_iter")
    meta = {"num_layers": num_layers, "sublayers": sublayers, "max_new_tokens": max_new_tokens,
            "prompts": [r[0].tolist() for r in rows], "draft_len": draft_len,
            "draft_threshold": draft_threshold}
    path = Path(checkpoint) if checkpoint is not None else None
    evaluations = _load(path, meta) if path is not None and path.exists() else []
    common = dict(max_new_tokens=max_new_tokens, **generate_options)
    spec_options = dict(strategy="layer_skip", draft_len=draft_len,
                        draft_threshold=draft_threshold, **common)

    # The first generate call may calibrate kernels; keep that out of every timing.
    time_decoding(model, rows[:1], timer, **common)
    bar = tqdm(total=len(schedule), initial=min(len(evaluations), len(schedule)),
               desc="bayes_search_skip_layers", disable=not progress, leave=False)
    try:
        for i in range(len(evaluations), len(schedule)):
            how, x = schedule[i]
            rng = random.Random(seed * 1_000_003 + i)  # the same point after a resumption
            if x is None and (how == "random" or not evaluations):
                x = [rng.random() for _ in units]
            elif x is None:
                xs = torch.tensor([e["x"] for e in evaluations], dtype=torch.float64)
                ys = torch.tensor([e["tokens_per_s"] for e in evaluations], dtype=torch.float64)
                x = next_point(xs, ys, rng)
            skip = point_skip(x, units)
            if skip:
                tokens, seconds = time_decoding(model, rows, timer, skip=skip, **spec_options)
                score = tokens / max(seconds, 1e-12)
            else:  # names no set: not decoded, the lowest score so far
                tokens, seconds = 0, 0.0
                score = min((e["tokens_per_s"] for e in evaluations), default=0.0)
            evaluations.append({"x": x, "skip": skip_spec(skip), "how": how, "tokens": tokens,
                                "seconds": seconds, "tokens_per_s": score})
            if path is not None:
                _save(path, meta, evaluations)
            bar.update(1)
            bar.set_postfix(best=f"{max(e['tokens_per_s'] for e in evaluations):.1f} tok/s")
    finally:
        bar.close()

    decoded = [e for e in evaluations if e["tokens"]]
    if not decoded:
        raise ConfigError("no evaluated point named a set to skip")
    fastest = max(decoded, key=lambda e: e["tokens_per_s"])["skip"]
    runs: dict[str, list[float]] = {"greedy": [], "fastest": []}
    for rep in range(confirm):  # interleaved, the order alternating per repetition
        order = ("greedy", "fastest") if rep % 2 == 0 else ("fastest", "greedy")
        for which in order:
            options = common if which == "greedy" else dict(skip=fastest, **spec_options)
            tokens, seconds = time_decoding(model, rows, timer, **options)
            runs[which].append(tokens / max(seconds, 1e-12))
    fast, greedy = statistics.median(runs["fastest"]), statistics.median(runs["greedy"])
    speedup = fast / greedy
    return TimedSkipSearch(skip=fastest if speedup > 1.0 else {}, fastest=fastest,
                           tokens_per_s=fast, greedy_tokens_per_s=greedy,
                           speedup_vs_greedy=speedup, history=evaluations, confirmation=runs)

"""Drafting with the model itself minus some of its sub-layers (Draft & Verify; SWIFT).

Draft & Verify (Zhang et al., ACL 2024, "Draft & Verify: Lossless Large Language Model
Acceleration via Self-Speculative Decoding") drafts with the same LLM skipping a set of its
intermediate attention and MLP sub-layers, chosen offline by Bayesian optimisation, and
verifies the drafts with the whole model; SWIFT (Xia et al., 2024) chooses the skipped set on
the fly during decoding. No extra head, no training.

A skip set names sub-layers: ``(block, "attn")`` or ``(block, "mlp")``, block in 1..L-2 (the
reference's two sets, ``attn_skip_layer_id_set`` and ``mlp_skip_layer_id_set``; the first and
last blocks are always kept). Users may write it as block indices (both sub-layers of each),
as such pairs, or as ``{"attn": [...], "mlp": [...]}`` (:func:`check_skip`). A skipped
sub-layer adds nothing to the residual stream (the block's other sub-layer still runs,
:meth:`~exitwise.backbones.HFDecoderBackbone.run_part`).

:class:`LayerSkipDrafter` is a :class:`~.ngram.Proposer`: for each step it runs the pending
token and then its own drafts through the kept sub-layers only (each kept attention appends
its keys/values to the shared cache, so later drafts attend to earlier ones; a block whose
attention is skipped is never read while drafting), reads the next token with the final
norm and the LM head, and afterwards removes what it appended, so verification (every block,
all k + 1 positions at once) writes them anew. Drafts are the draft model's argmax; with
sampling they count as point masses, which keeps speculative sampling exact.

:func:`search_skip_layers` chooses the skipped set offline on the model's own greedy text:
greedy forward selection (repeatedly add the sub-layer whose removal loses the least agreement
of the draft model's next token with the full model's per share of the pass it saves, until
even skipping everything left for free could not beat the best set), each candidate set scored
by the tokens per unit of time it would give (:func:`estimated_speedup`: acceptance from the
measured agreement, cost from the share of the pass's weights the draft still reads,
:func:`kept_share`: LM head included, verification counted as one full pass).

Reference read: the authors' code (dilab-zju/self-speculative-decoding): ``searching.py``
(``LayerSkippingSearching``: Bayesian optimisation over 2L binary choices, skip each layer's
attention and/or MLP, scored by the measured tokens/s of ``exact_self_speculative_generate``
on a few prompts) and ``decoding.py`` (``exact_self_speculative_generate``: drafts of at most
``max_step_draft=8`` tokens, a draft stops when its top-1 probability falls below
``th_stop_draft`` (0.8), adapted after each step from the acceptance; the draft's keys/values
are discarded, verification recomputes the drafted positions in every layer). Deviations:
greedy forward selection with a modelled objective instead of Bayesian optimisation on timed
decoding (``sublayers=False`` searches whole blocks instead; the paper's Bayesian search is
:func:`~.skip_bayes.bayes_search_skip_layers`); the first and last blocks are
always kept; by default the draft length comes from the measured-cost controller
(:mod:`.draft_control`, ``draft_len="auto"``, at most 8 as in the reference) or is fixed;
the reference's adaptive draft exiting is ``draft_len=8, draft_threshold="auto"``
(:class:`DraftThreshold`; with a batch, each row stops on its own draft's confidence and the
threshold is updated once per row outcome). SWIFT's on-the-fly search is :mod:`.swift`;
its token trees of the draft model's next choices (``tree``) are :mod:`.token_tree`'s.
Shapes: A active rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Mapping, Sequence

import torch

from ..backbones.hf_decoder import PARTS
from ..errors import ConfigError
from .token_tree import (
    check_tree_width,
    most_candidates,
    nominal_width,
    sibling_tokens,
    step_widths,
)

#: one sub-layer: (block index, "attn" | "mlp")
SubLayer = tuple[int, str]


def check_skip(skip: Any, num_layers: int) -> list[SubLayer]:
    """The sub-layers ``skip`` names, sorted and distinct, blocks in 1..L-2 (the first and the
    last block are always kept). skip: block indices (both sub-layers of each), (block, part)
    pairs, or a mapping {"attn": blocks, "mlp": blocks}; any mix of the first two."""
    items: list[Any]
    if isinstance(skip, Mapping):
        unknown = sorted(set(skip) - set(PARTS))
        if unknown:
            raise ConfigError(f"a skip mapping has the keys {PARTS}; got {unknown}")
        items = [(b, part) for part in PARTS for b in skip.get(part, ())]
    elif isinstance(skip, (str, bytes)) or not isinstance(skip, Sequence):
        raise ConfigError("skip is a list of blocks, of (block, part) pairs, or "
                          f"{{'attn': [...], 'mlp': [...]}}; got {skip!r}")
    else:
        items = list(skip)
    out: set[SubLayer] = set()
    for item in items:
        if isinstance(item, Integral) and not isinstance(item, bool):
            out.update((int(item), part) for part in PARTS)
        elif isinstance(item, Sequence) and len(item) == 2 and item[1] in PARTS:
            out.add((int(item[0]), str(item[1])))
        else:
            raise ConfigError(f"a skip entry is a block index or a (block, part) pair with part "
                              f"in {PARTS}; got {item!r}")
    bad = sorted({b for b, _ in out if not 1 <= b <= num_layers - 2})
    if bad:
        raise ConfigError(f"skipped blocks must be in 1..{num_layers - 2} (the first and the last "
                          f"block are kept); got {bad}")
    if not out:
        raise ConfigError("skip at least one sub-layer (an empty set drafts with the full model)")
    return sorted(out)


def skip_spec(skip: Sequence[SubLayer]) -> dict[str, list[int]]:
    """A skip set as the reference writes it: {"attn": blocks, "mlp": blocks} (JSON-ready)."""
    return {part: sorted(b for b, p in skip if p == part) for part in PARTS}


def skip_units(num_layers: int, sublayers: bool = True) -> list[tuple[SubLayer, ...]]:
    """The units a search skips or keeps: each attention and each MLP of blocks 1..L-2 (all
    attentions first, then all MLPs), or with ``sublayers=False`` each such block whole."""
    blocks = range(1, num_layers - 1)
    if sublayers:
        return [((b, part),) for part in PARTS for b in blocks]
    return [tuple((b, part) for part in PARTS) for b in blocks]


def skip_point(skip: Sequence[SubLayer], units: Sequence[tuple[SubLayer, ...]]) -> list[float]:
    """The 0/1 point of a set: 1.0 for each unit all of whose sub-layers ``skip`` names."""
    gone = set(skip)
    return [float(all(sub in gone for sub in unit)) for unit in units]


def skip_plan(skip: Sequence[SubLayer], num_layers: int) -> list[tuple[int, int, str | None]]:
    """How to run the draft model: (start, end, None) for a run of whole kept blocks
    [start, end) (one ``run_layers`` call), (i, i + 1, part) for block i with only ``part``."""
    gone = set(skip)
    plan: list[tuple[int, int, str | None]] = []
    for i in range(num_layers):
        kept = [p for p in PARTS if (i, p) not in gone]
        if len(kept) == len(PARTS):
            if plan and plan[-1][2] is None and plan[-1][1] == i:
                plan[-1] = (plan[-1][0], i + 1, None)
            else:
                plan.append((i, i + 1, None))
        elif kept:
            plan.append((i, i + 1, kept[0]))
    return plan


def run_plan(backbone: Any, plan: Sequence[tuple[int, int, str | None]], hidden: torch.Tensor,
             ctx: Any) -> torch.Tensor:
    """hidden (B, q, H) through the kept sub-layers of ``plan`` (:func:`skip_plan`)."""
    for start, end, part in plan:
        if part is None:
            hidden = backbone.run_layers(hidden, start, end, ctx)
        else:
            hidden = backbone.run_part(start, part, hidden, ctx)
    return hidden


def pass_weights(backbone: Any) -> tuple[int, list[tuple[int, int]]]:
    """(LM head parameters, each block's (attention, MLP) parameters): what a pass reads."""
    return (sum(p.numel() for p in backbone.lm_head.parameters()), backbone.part_sizes())


def kept_share(backbone: Any, skip: Sequence[SubLayer],
               weights: tuple[int, list[tuple[int, int]]] | None = None) -> float:
    """The share of a decoding pass's weights a draft without ``skip`` still reads: the kept
    sub-layers' parameters plus the LM head's, over all blocks' plus the LM head's (on a CPU
    a one-token pass costs about what reading its weights costs). weights: the backbone's
    :func:`pass_weights`, when already counted (a search asks thousands of times)."""
    head, sizes = weights or pass_weights(backbone)
    total = head + sum(a + m for a, m in sizes)
    gone = sum(sizes[b][PARTS.index(p)] for b, p in set(skip))
    return (total - gone) / total


@dataclass
class DraftThreshold:
    """Draft & Verify's draft-exiting rule (``decoding.py``, ``exact_self_speculative_generate``
    with ``th_stop_draft=0.8, auto_th_stop_draft=True, auto_parameters=[1, 0.5, 0.9, 1e-2,
    0.9]``): a row stops drafting after a draft token whose probability under the draft model
    is below ``value`` (that token is still proposed); with ``adaptive``, after each verified
    step the smoothed share of drafts kept, m <- beta1 m + (1 - beta1) accepted / drafted,
    moves the threshold: up by ``step`` while m < ``target`` (drafts are rejected too often),
    kept when the draft reached its longest length, else down by ``step``, the move smoothed,
    value <- beta2 value + (1 - beta2) new. One update per row outcome, in row order (the
    reference decodes one row)."""

    value: float = 0.8
    adaptive: bool = True
    beta1: float = 0.5
    target: float = 0.9
    step: float = 1e-2
    beta2: float = 0.9
    matchness: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not 0.0 <= float(self.value) <= 1.0:
            raise ConfigError(f"a draft threshold is a probability in [0, 1]; got {self.value!r}")

    def update(self, accepted: int, drafted: int, max_len: int) -> None:
        """One row's verified step: ``accepted`` of ``drafted`` drafts kept, of at most
        ``max_len``."""
        if not self.adaptive or drafted <= 0:
            return
        self.matchness = self.beta1 * self.matchness + (1 - self.beta1) * accepted / drafted
        if self.matchness < self.target:
            new = self.value + self.step
        elif drafted == max_len:
            new = self.value
        else:
            new = self.value - self.step
        self.value = self.beta2 * self.value + (1 - self.beta2) * new


def draft_threshold(value: Any) -> DraftThreshold | None:
    """A strategy's ``draft_threshold`` option: None (lengths from ``draft_len`` alone),
    "auto" (Draft & Verify's adaptive rule from 0.8) or a fixed probability."""
    if value is None:
        return None
    if value == "auto":
        return DraftThreshold()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"draft_threshold is None, 'auto' or a probability; got {value!r}")
    return DraftThreshold(float(value), adaptive=False)


class LayerSkipDrafter:
    """Proposes drafts from the model with sub-layers ``skip`` left out (see the module
    docstring); with a ``threshold`` (:class:`DraftThreshold`) a row's draft also stops at its
    first token whose draft probability is below it. ``tree``: 1 (a chain), an int W > 1 (each
    draft's next W - 1 choices of the draft model are verified as sibling leaves of a token
    tree, :mod:`.token_tree`), or "confidence" (SWIFT's dynamic verification: per depth, as
    many candidates as :func:`~.token_tree.confidence_widths` gives the draft's top-1
    probability there; ``sampling`` selects the sampling counts). After a proposal with a
    tree, ``tree_siblings`` (A, n, max width - 1) and ``tree_widths`` (n widths) describe the
    tree of its n depths (both None for a chain)."""

    source = "layer_skip"
    passes = "per_draft"

    def __init__(self, skip: Any, num_layers: int,
                 threshold: DraftThreshold | None = None, tree: int | str = 1,
                 sampling: bool = False) -> None:
        self.num_layers = num_layers
        self.threshold = threshold
        self.tree = check_tree_width(tree)
        self.sampling = sampling
        self.longest = 0  # the caps' maximum at the last proposal (the threshold's max_len)
        self.tree_siblings: torch.Tensor | None = None
        self.tree_widths: tuple[int, ...] | None = None
        self.set_skip(skip)

    @property
    def nominal_width(self) -> float:
        """Verified positions per draft before any tree is seen (the controller's prior)."""
        return nominal_width(self.tree, self.sampling)

    def set_skip(self, skip: Any) -> None:
        """Draft without sub-layers ``skip`` from now on (SWIFT changes the set while
        decoding)."""
        self.skip = check_skip(skip, self.num_layers)
        self.plan = skip_plan(self.skip, self.num_layers)
        # the blocks whose attention runs: their cache layers get the drafts' keys/values
        gone = set(self.skip)
        self.attends = [i for i in range(self.num_layers) if (i, "attn") not in gone]
        self.sublayers_run = len(PARTS) * self.num_layers - len(self.skip)

    def run(self, backbone: Any, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        """hidden (A, q, H) through the draft model's kept sub-layers."""
        return run_plan(backbone, self.plan, hidden, ctx)

    def start(self, prompts: list[list[int]]) -> None:
        """Nothing to prepare: the draft model is the model itself."""

    def prepare(self, session: Any) -> None:
        """Nothing before a step: the skipped set is fixed (see :mod:`.swift`)."""

    @torch.inference_mode()
    def propose_rows(self, session: Any, caps: list[int]) -> list[list[int]]:
        """Up to ``caps[i]`` greedy draft tokens per active row (fewer where the threshold
        stops a row); the cache is left as found."""
        k = max(caps, default=0)
        self.longest = k
        self.tree_siblings = self.tree_widths = None
        if k <= 0:
            return [[] for _ in caps]
        bb = session.backbone
        tokens = session.pending
        drafts: list[list[int]] = []
        lengths = list(caps)
        ran = 0
        tops: list[torch.Tensor] = []  # (A, most candidates) per depth, token trees only
        sure_of: list[list[float]] = []  # (A,) top-1 probabilities per depth
        most = most_candidates(self.tree, self.sampling)
        for j in range(k):
            ctx = session.context(j, 1)
            hidden = self.run(bb, bb.embed(tokens[:, None], ctx.positions), ctx)
            logits = bb.lm_logits(bb.final_norm(hidden[:, -1]))
            tokens = logits.argmax(-1)
            drafts.append(tokens.tolist())
            ran += 1
            session.stats.draft_sublayer_applications += len(caps) * self.sublayers_run
            if self.threshold is not None or self.tree == "confidence":
                top1 = logits.float().softmax(-1).amax(-1)
                sure_of.append(top1.tolist())
            if most > 1:
                tops.append(sibling_tokens(logits.topk(min(most, logits.shape[-1])).indices,
                                           tokens, most - 1))
            if self.threshold is not None:  # a row stops after an unsure draft token
                sure = [p >= self.threshold.value for p in sure_of[-1]]
                lengths = [j + 1 if c > j and not ok else c for c, ok in zip(lengths, sure)]
                if all(c <= j + 1 for c in lengths):
                    break
        for i in self.attends:  # verification recomputes these positions in every block
            session.cache.layers[i].crop(-ran)
        if most > 1:
            self._set_tree(tops, sure_of, lengths)
        return [[drafts[j][r] for j in range(c)] for r, c in enumerate(lengths)]

    def _set_tree(self, tops: list[torch.Tensor], sure_of: list[list[float]],
                  lengths: list[int]) -> None:
        """The step's tree: per depth j, the width (fixed, or the largest count SWIFT's rule
        gives the rows still drafting there: at batch 1 the reference's), and the siblings
        (the draft model's next choices after the chain's own, best first)."""
        if self.tree == "confidence":
            widths = list(step_widths(sure_of, lengths, self.sampling))
        else:
            widths = [int(self.tree)] * len(tops)
        most = max(widths)
        self.tree_widths = tuple(widths)
        self.tree_siblings = torch.stack(tops, 1)[:, :, : most - 1]

    def observe(self, accepted: list[int], drafted: list[int]) -> None:
        """A verified step's outcome for the rows this drafter proposed for: per row, drafts
        kept and drafts proposed (updates an adaptive threshold)."""
        if self.threshold is not None:
            for n, k in zip(accepted, drafted):
                self.threshold.update(n, k, self.longest)


def estimated_speedup(agreement: float, kept_share: float, max_len: int = 8) -> float:
    """Tokens per full-pass time of the best draft length k: (1 + a + ... + a^k) /
    (k * kept_share + 1), a = ``agreement`` (each draft kept with that chance until the first
    miss), a draft pass costing ``kept_share`` of a full pass, verification one pass."""
    a = min(max(agreement, 0.0), 1.0)
    best = 1.0
    for k in range(1, max_len + 1):
        best = max(best, sum(a ** i for i in range(k + 1)) / (k * kept_share + 1.0))
    return best


@dataclass
class SkipSearch:
    """What :func:`search_skip_layers` found: the chosen ``skip`` set ({"attn": blocks,
    "mlp": blocks}; empty when no set is modelled to pay), its agreement with the full model's
    greedy next token, its :func:`kept_share` and modelled speed-up, and each step of the
    search (the same fields)."""

    skip: dict[str, list[int]]
    agreement: float
    estimated_speedup: float
    kept_share: float = 1.0
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.inference_mode()
def _agreement(backbone: Any, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
               skip: Sequence[SubLayer]) -> float:
    """Share of target positions where the model without sub-layers ``skip`` predicts the
    target (teacher-forced over the whole text at once). ids, mask, targets: (B, T); -1 = no
    target."""
    state = backbone.start(input_ids=ids, attention_mask=mask)
    state.hidden = run_plan(backbone, skip_plan(skip, backbone.num_layers), state.hidden,
                            state.shared["ctx"])
    hidden, _ = backbone.features(state)
    pred = backbone.lm_logits(backbone.final_norm(hidden)).argmax(-1)
    real = targets >= 0
    return float((pred[real] == targets[real]).double().mean()) if bool(real.any()) else 0.0


def search_skip_layers(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32, max_skip: int | None = None, patience: int = 2,
    sublayers: bool = True, progress: bool = True,
) -> SkipSearch:
    """Choose the sub-layers to skip for :class:`LayerSkipDrafter` (Draft & Verify's offline
    step, by greedy forward selection; see the module docstring).

    input_ids, attention_mask: (B, T) prompts; the model's own greedy continuations of
    ``max_new_tokens`` are the text the drafts must match. max_skip: most candidates to skip
    (default all). patience: stop after this many additions in a row whose agreement could not
    beat the best modelled speed-up so far even if every remaining candidate were skipped for
    free (``estimated_speedup(agreement, share with all candidates skipped)``: an optimistic
    bound, as agreement rarely rises when more is skipped; the first few additions of a deep
    model cannot pay by themselves, so "no improvement" would stop too early). sublayers:
    candidates are the attention and the MLP of each block 1..L-2 apart (the reference's
    2(L-2) choices), else whole blocks. progress: a progress bar over the additions. Returns
    the best set seen.
    """
    from tqdm.auto import tqdm

    from ..backbones import decoder_of
    from .api import generate

    backbone, _ = decoder_of(model, "search_skip_layers")
    num_layers = backbone.num_layers
    if num_layers < 3:
        raise ConfigError("skipping needs a model of at least 3 blocks (the first and the last "
                          "are always kept)")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ConfigError(f"patience must be an int >= 1; got {patience!r}")
    out = generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                   eos_token_id=[])
    seqs = out.sequences
    t = input_ids.shape[1]
    mask = torch.ones_like(seqs)
    if attention_mask is not None:
        mask[:, :t] = attention_mask
    targets = torch.full_like(seqs, -1)
    targets[:, t - 1:-1] = seqs[:, t:]  # position p predicts the token at p + 1 (the answer)
    candidates = skip_units(num_layers, sublayers)
    limit = len(candidates) if max_skip is None else min(max_skip, len(candidates))
    weights = pass_weights(backbone)
    floor = kept_share(backbone, [sub for c in candidates for sub in c], weights)
    chosen: list[SubLayer] = []
    best = SkipSearch({}, 1.0, 1.0)
    history: list[dict[str, Any]] = []
    worse = 0
    bar = tqdm(total=limit, desc="search_skip_layers", disable=not progress, leave=False)
    try:
        agreement = _agreement(backbone, seqs, mask, targets, [])
        share = 1.0
        while len(history) < limit and worse < patience:
            left = [c for c in candidates if c[0] not in chosen]
            scored = []
            for i, c in enumerate(left):
                a_c = _agreement(backbone, seqs, mask, targets, chosen + list(c))
                saved = share - kept_share(backbone, chosen + list(c), weights)
                # agreement lost per share of the pass saved; ties: the larger saving, then
                # the first candidate
                scored.append(((agreement - a_c) / saved, -saved, i, a_c))
            _, _, pick, agreement = min(scored)
            chosen.extend(left[pick])
            share = kept_share(backbone, chosen, weights)
            speed = estimated_speedup(agreement, share)
            bound = estimated_speedup(agreement, floor)
            history.append({"skip": skip_spec(chosen), "agreement": agreement,
                            "kept_share": share, "estimated_speedup": speed,
                            "optimistic_speedup": bound})
            bar.update(1)
            if speed > best.estimated_speedup:
                best = SkipSearch(skip_spec(chosen), agreement, speed, share)
            worse = worse + 1 if bound <= best.estimated_speedup else 0
    finally:
        bar.close()
    best.history = history
    return best

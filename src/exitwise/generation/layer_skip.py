"""Drafting with the model itself minus some of its blocks (Draft & Verify; SWIFT).

Draft & Verify (Zhang et al., ACL 2024, "Draft & Verify: Lossless Large Language Model
Acceleration via Self-Speculative Decoding") drafts with the same LLM skipping a set of its
intermediate layers, chosen offline by Bayesian optimisation, and verifies the drafts with the
whole model; SWIFT (Xia et al., 2024) chooses the skipped set on the fly during decoding. No
extra head, no training.

:class:`LayerSkipDrafter` is a :class:`~.ngram.Proposer`: for each step it runs the pending
token and then its own drafts through the kept blocks only (each kept block appends its
keys/values to the shared cache, so later drafts attend to earlier ones), reads the next token
with the final norm and the LM head, and afterwards removes what it appended from every kept
block's cache, so verification (every block, all k + 1 positions at once) writes them anew.
Drafts are the draft model's argmax; with sampling they count as point masses, which keeps
speculative sampling exact.

:func:`search_skip_layers` chooses the skipped set offline on the model's own greedy text:
greedy forward selection (repeatedly add the block whose removal keeps the draft model's next
token equal to the full model's most often), each candidate set scored by the tokens per unit
of time it would give (:func:`estimated_speedup`: acceptance from the measured agreement,
cost from the share of blocks kept, verification counted as one full pass).

Reference read: the authors' code (dilab-zju/self-speculative-decoding): ``searching.py``
(``LayerSkippingSearching``: Bayesian optimisation over 2L binary choices, skip each layer's
attention and/or MLP, scored by the measured tokens/s of ``exact_self_speculative_generate``
on a few prompts) and ``decoding.py`` (``exact_self_speculative_generate``: drafts of at most
``max_step_draft=8`` tokens, a draft stops when its top-1 probability falls below
``th_stop_draft`` (0.8), adapted after each step from the acceptance; the draft's keys/values
are discarded, verification recomputes the drafted positions in every layer). Deviations:
whole blocks are skipped (not attention and MLP separately); greedy forward selection with a
modelled objective instead of Bayesian optimisation on timed decoding; the first and last
blocks are always kept; the draft length comes from the measured-cost controller
(:mod:`.draft_control`, ``draft_len="auto"``, at most 8 as in the reference) or is fixed,
instead of the adaptive confidence threshold. SWIFT's on-the-fly search is :mod:`.swift`.
Shapes: A active rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import ConfigError


def check_skip(skip: Sequence[int], num_layers: int) -> list[int]:
    """Sorted distinct block indices in 1..L-2 (the first and last blocks are always kept)."""
    out = sorted({int(i) for i in skip})
    bad = [i for i in out if not 1 <= i <= num_layers - 2]
    if bad:
        raise ConfigError(f"skipped blocks must be in 1..{num_layers - 2} (the first and the last "
                          f"block are kept); got {bad}")
    if not out:
        raise ConfigError("skip at least one block (an empty set drafts with the full model)")
    return out


class LayerSkipDrafter:
    """Proposes drafts from the model with blocks ``skip`` left out (see the module docstring)."""

    source = "layer_skip"
    passes = "per_draft"

    def __init__(self, skip: Sequence[int], num_layers: int) -> None:
        self.num_layers = num_layers
        self.set_skip(skip)

    def set_skip(self, skip: Sequence[int]) -> None:
        """Draft without blocks ``skip`` from now on (SWIFT changes the set while decoding)."""
        self.skip = check_skip(skip, self.num_layers)
        self.keep = [i for i in range(self.num_layers) if i not in set(self.skip)]
        # runs of consecutive kept blocks [start, end): one run_layers call each
        self.runs: list[tuple[int, int]] = []
        for i in self.keep:
            if self.runs and self.runs[-1][1] == i:
                self.runs[-1] = (self.runs[-1][0], i + 1)
            else:
                self.runs.append((i, i + 1))

    def start(self, prompts: list[list[int]]) -> None:
        """Nothing to prepare: the draft model is the model itself."""

    def prepare(self, session: Any) -> None:
        """Nothing before a step: the skipped set is fixed (see :mod:`.swift`)."""

    @torch.inference_mode()
    def propose_rows(self, session: Any, caps: list[int]) -> list[list[int]]:
        """Up to ``caps[i]`` greedy draft tokens per active row; the cache is left as found."""
        k = max(caps, default=0)
        if k <= 0:
            return [[] for _ in caps]
        bb = session.backbone
        tokens = session.pending
        drafts: list[list[int]] = []
        for j in range(k):
            ctx = session.context(j, 1)
            hidden = bb.embed(tokens[:, None], ctx.positions)
            for start, end in self.runs:
                hidden = bb.run_layers(hidden, start, end, ctx)
            tokens = bb.lm_logits(bb.final_norm(hidden[:, -1])).argmax(-1)
            drafts.append(tokens.tolist())
        for i in self.keep:  # verification recomputes these positions in every block
            session.cache.layers[i].crop(-k)
        return [[drafts[j][r] for j in range(c)] for r, c in enumerate(caps)]


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
    """What :func:`search_skip_layers` found: the chosen ``skip`` set, its agreement with the
    full model's greedy next token and modelled speed-up, and each step of the search."""

    skip: list[int]
    agreement: float
    estimated_speedup: float
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.inference_mode()
def _agreement(backbone: Any, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
               skip: set[int]) -> float:
    """Share of target positions where the model without blocks ``skip`` predicts the target
    (teacher-forced over the whole text at once). ids, mask, targets: (B, T); -1 = no target."""
    state = backbone.start(input_ids=ids, attention_mask=mask)
    for i in range(backbone.num_layers):
        if i not in skip:
            state = backbone.step(i, state)
    hidden, _ = backbone.features(state)
    pred = backbone.lm_logits(backbone.final_norm(hidden)).argmax(-1)
    real = targets >= 0
    return float((pred[real] == targets[real]).double().mean()) if bool(real.any()) else 0.0


def search_skip_layers(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32, max_skip: int | None = None, patience: int = 2,
) -> SkipSearch:
    """Choose the blocks to skip for :class:`LayerSkipDrafter` (Draft & Verify's offline step,
    by greedy forward selection; see the module docstring).

    input_ids, attention_mask: (B, T) prompts; the model's own greedy continuations of
    ``max_new_tokens`` are the text the drafts must match. max_skip: most blocks to skip
    (default L - 2). patience: stop after this many additions that do not improve the
    modelled speed-up. Returns the best set seen.
    """
    from ..backbones import decoder_of
    from .api import generate

    backbone, _ = decoder_of(model, "search_skip_layers")
    num_layers = backbone.num_layers
    if num_layers < 3:
        raise ConfigError("skipping needs a model of at least 3 blocks (the first and the last "
                          "are always kept)")
    out = generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                   eos_token_id=[])
    seqs = out.sequences
    t = input_ids.shape[1]
    mask = torch.ones_like(seqs)
    if attention_mask is not None:
        mask[:, :t] = attention_mask
    targets = torch.full_like(seqs, -1)
    targets[:, t - 1:-1] = seqs[:, t:]  # position p predicts the token at p + 1 (the answer)
    candidates = list(range(1, num_layers - 1))
    limit = len(candidates) if max_skip is None else min(max_skip, len(candidates))
    chosen: set[int] = set()
    best = SkipSearch([], 1.0, 1.0)
    history: list[dict[str, Any]] = []
    worse = 0
    while len(chosen) < limit and worse < patience:
        scored = [(_agreement(backbone, seqs, mask, targets, chosen | {i}), i)
                  for i in candidates if i not in chosen]
        agreement, layer = max(scored)
        chosen.add(layer)
        kept = (num_layers - len(chosen)) / num_layers
        speed = estimated_speedup(agreement, kept)
        history.append({"skip": sorted(chosen), "agreement": agreement,
                        "estimated_speedup": speed})
        if speed > best.estimated_speedup:
            best, worse = SkipSearch(sorted(chosen), agreement, speed), 0
        else:
            worse += 1
    best.history = history
    return best

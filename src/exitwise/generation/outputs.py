"""What the generators return: the token sequences and the work it took."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call (decoding phase; the prompt prefill is the same for
    every strategy and is not counted except in ``prefill_layer_applications``).

    new_tokens:  per row, tokens generated (EOS included, padding excluded).
    drafted:     per row, draft tokens proposed (speculative strategies only).
    accepted:    per row, draft tokens the full model confirmed and the row emitted (none past
                 its EOS, a stop string or its token budget).
    iterations:  decoding steps (greedy: one per token; self-speculative: draft + verify).
    layer_applications: sum over rows and token positions of blocks applied after prefill
        (a measure of compute; rejected drafts count as waste).
    sequential_layers:  block calls one after another, each on the whole batch and all its
        new positions at once (a latency proxy on hardware where a block's cost barely grows
        with a few more positions).
    head_applications:  exit-head evaluations (row x position) for drafts.
    draft_sublayer_applications: attention or MLP sub-layers applied by a layer-skipping draft
        model (:mod:`.layer_skip`, :mod:`.swift`; row x position, SWIFT's scoring passes
        included; a whole block is two), work not counted in ``layer_applications``.
    kernels:            the ``kernels`` setting the call ran with ("auto", "stock", ...).
    streamed_products:  few-row products that took the streaming kernel (0: all stock).
    ngram_drafted / ngram_accepted: of the drafted / accepted tokens, those that came from
        n-gram lookups (:mod:`.ngram`).
    sibling_accepted:   of the accepted tokens, those that were a token tree's sibling leaf (the
        exit's second or later choice, :mod:`.token_tree`).
    step_draft_lengths: per speculative step, its draft length k (the longest row's).
    """

    strategy: str
    num_layers: int
    exit_layer: int | None = None
    draft_len: int | None = None
    new_tokens: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    iterations: int = 0
    layer_applications: int = 0
    sequential_layers: int = 0
    head_applications: int = 0
    draft_sublayer_applications: int = 0
    prefill_layer_applications: int = 0
    kernels: str | None = None
    streamed_products: int = 0
    ngram_drafted: int = 0
    ngram_accepted: int = 0
    sibling_accepted: int = 0
    step_draft_lengths: list[int] = field(default_factory=list)

    @property
    def total_drafted(self) -> int:
        return int(sum(self.drafted))

    @property
    def total_accepted(self) -> int:
        return int(sum(self.accepted))

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted draft tokens over the whole batch (0.0 when nothing was drafted)."""
        return self.total_accepted / self.total_drafted if self.total_drafted else 0.0

    @property
    def decoded_tokens(self) -> int:
        """Tokens produced after the first one (which comes from the prefill)."""
        return int(sum(max(n - 1, 0) for n in self.new_tokens))

    @property
    def layer_applications_per_token(self) -> float:
        return self.layer_applications / self.decoded_tokens if self.decoded_tokens else 0.0

    @property
    def sequential_layers_per_token(self) -> float:
        """Block calls per generated token per row (greedy: exactly num_layers)."""
        if not self.new_tokens or not self.decoded_tokens:
            return 0.0
        per_row = self.decoded_tokens / len(self.new_tokens)
        return self.sequential_layers / per_row

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in (
            "acceptance_rate", "layer_applications_per_token", "sequential_layers_per_token",
            "total_drafted", "total_accepted", "decoded_tokens",
        ):
            out[name] = getattr(self, name)
        return out


@dataclass
class GenerateOutput:
    """sequences: (B, T + N) the prompts as given followed by the generated tokens, rows that
    stopped early padded with the pad id (like ``model.generate``). stats: the counters."""

    sequences: torch.Tensor
    stats: GenerationStats

"""``voting``: the voting-based exit of Sun et al. (2021), "Early Exiting with Ensemble Internal
Classifiers" (arXiv 2105.13792, the voting strategy of its method section).

Every exit seen so far votes for its arg-max class. A row leaves at exit k as soon as one class
has collected ``votes`` votes among exits 0..k:

    V_c(k) = #{ j <= k : argmax p_j = c },      exit at k  <=>  max_c V_c(k) >= votes

Reference: the authors released no code (none is linked from the paper's arXiv page or from
their ``txsun1997/awesome-early-exiting`` list, and none is in the indexed repositories), and
the paper's body could not be read where this was written (only its abstract: "a simple
voting-based strategy that considers predictions of all the past internal classifiers to infer
the correct label and decide whether to exit"). The rule below is therefore built from that
sentence; its choices are stated so they can be checked against the paper:

- Counts, not the fraction of exits seen: ``V_c(k) / (k + 1)`` is 1 at the first exit for
  every row, so a fraction-of-seen rule alone would stop everyone at exit 0. A fraction of
  *all* exits, ``V_c / K >= g``, is the count rule with ``votes = ceil(g K)``.
- Ties cannot arise when a row leaves early: only the class exit k votes for gains a vote at
  k, so the first class to reach ``votes`` is unique and is exit k's own arg-max. A row that
  leaves early therefore returns exit k's own logits, whose arg-max *is* the winning vote.
- A row that reaches the final exit without any class reaching ``votes`` returns the final
  exit's own prediction (as PABEE does when its patience is never met), not the plurality of
  the votes. This keeps the never-exit setting (``votes = K``) equal to the plain model.

Tuned parameter: ``votes`` (an integer >= 1; higher is safer). ``grid`` runs from 1 (everyone
leaves at exit 0) to the number of exits (nobody leaves early). The default, 2, is not from the
paper.

Classification only: a regression output casts no class vote.

State: ``votes`` (B, C) long, the votes each class got from the exits seen (the class count is
known at the first exit, so it starts as (B, 0)).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState, register_policy


def add_votes(votes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Add one exit's votes: ``votes`` (B, C) or (B, 0) long, ``logits`` (B, C) -> (B, C)."""
    ballot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.long)
    return ballot if votes.shape[1] == 0 else votes + ballot


@register_policy("voting")
class VotingPolicy(ExitPolicy):
    """Exit once one class has ``votes`` votes among the exits seen; (B, C) -> (B,) bool."""

    param = "votes"
    safer_when = "higher"
    param_range = (1, 10_000)

    def __init__(self, votes: int = 2) -> None:
        if isinstance(votes, float) and votes.is_integer():
            votes = int(votes)
        super().__init__(votes=votes)
        if not isinstance(votes, int) or isinstance(votes, bool):
            raise ConfigError(f"voting: votes must be an integer >= 1, got {votes!r}")

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        return {"votes": torch.zeros(batch_size, 0, dtype=torch.long, device=device)}

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        votes = add_votes(state["votes"], logits)
        return votes.amax(-1) >= self.value, {"votes": votes}

    def grid(self, num_exits: int) -> list[float]:
        # The executor decides at exits 0..K-2, where at most K-1 votes exist: votes = K never
        # stops a row early (the full model).
        return list(range(1, max(num_exits, 1) + 1))

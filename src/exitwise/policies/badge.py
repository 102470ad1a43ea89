"""``badge``: BADGE's divergence-based early exit, DGE (Zhu, Wang, Ni, Xie and Wang, "BADGE:
Speeding Up BERT Inference after Deployment via Block-wise Bypasses and Divergence-based Early
Exiting", ACL 2023 Industry Track).

At exit k >= 1 the predicted distribution is compared with the previous exit's; the
comparison is "small" when the divergence is below ``threshold`` (strict). A row leaves once
``patience`` comparisons in a row were small (a larger divergence resets the run), so never
at exit 0:

    d_k = D(p_{k-1}, p_k),    run_k = run_{k-1} + 1 if d_k < threshold else 0,
    exit at k  <=>  run_k >= patience

``divergence``: ``"js"`` (default) Jensen-Shannon, ``(KL(p||m) + KL(q||m)) / 2`` with
``m = (p + q) / 2``, in nats (at most log 2); ``"kl"`` ``KL(p_{k-1} || p_k)``;
``"reverse_kl"`` ``KL(p_k || p_{k-1})``.

Reference: BADGE's code was announced ("will be made publicly available ... upon
acceptance") but is not in any indexed repository, and only the paper's abstract could be read
where this was written: DGE "obtains early exiting signals by comparing the predicted
distributions of two adjacent layers' exits". What the abstract does not say was taken from the
closest published relative by the same group, F-PABEE (Gao, Zhu et al.), whose released
inference loop (``JerryYin777/F-PABEE``, ``FPABEE/FPABEE/single_label/paccbee/
modeling_bert.py``, the ``patient_counter`` loop of ``BertModel.forward``) counts consecutive
Jensen-Shannon divergences below the threshold (strict ``<``, reset otherwise) and exits when the
count reaches the patience; its paper reports JS as the best measure. Hence the defaults
``divergence="js"`` and the run counter. ``patience = 1`` (one comparison of two adjacent
exits, the abstract's wording) is the default here; any larger value is F-PABEE's rule.
Check these choices against BADGE's Sec. on DGE before citing it.

Deviations from F-PABEE's loop: it compares one classifier applied to layers i and i+1; here
each exit has its own head and the comparison is between adjacent exits. Its regression branch
(an absolute difference) is not carried over: DGE compares distributions, classification only.

BADGE's other half, the block-wise bypasses (an architecture for training the multi-exit
model), is not implemented: the paper's description of it could not be read, so no faithful
version could be written.

Tuned parameter: ``threshold`` (lower is safer; 0 never exits early). Its default, 0.01, is not
from the paper.

State: ``logp`` (B, C) the previous exit's log-probabilities ((B, 0) before the first exit),
``run`` (B,) long the current run of small divergences.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState, register_policy

DIVERGENCES = ("js", "kl", "reverse_kl")


def kl_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from (B, C) log-probabilities -> (B,), 0 * log 0 taken as 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def divergence(previous: torch.Tensor, current: torch.Tensor, kind: str = "js") -> torch.Tensor:
    """(B,) divergence between two exits' (B, C) log-probabilities (see the module docstring)."""
    if kind == "kl":
        return kl_logp(previous, current)
    if kind == "reverse_kl":
        return kl_logp(current, previous)
    if kind == "js":
        log_m = torch.logaddexp(previous, current) - math.log(2.0)
        return 0.5 * (kl_logp(previous, log_m) + kl_logp(current, log_m))
    raise ConfigError(f"badge: divergence must be one of {', '.join(DIVERGENCES)}, got {kind!r}")


@register_policy("badge")
class BADGEPolicy(ExitPolicy):
    """Exit after ``patience`` small divergences between adjacent exits; (B, C) -> (B,) bool."""

    param = "threshold"
    safer_when = "lower"
    param_range = (0.0, math.inf)

    def __init__(self, threshold: float = 0.01, patience: int = 1, divergence: str = "js") -> None:
        if divergence not in DIVERGENCES:
            raise ConfigError(
                f"badge: divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}"
            )
        if isinstance(patience, float) and patience.is_integer():
            patience = int(patience)
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f"badge: patience must be an integer >= 1, got {patience!r}")
        super().__init__(threshold=threshold, patience=patience, divergence=divergence)

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        return {
            "logp": torch.zeros(batch_size, 0, device=device),
            "run": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        logp = torch.log_softmax(logits.float(), dim=-1)
        previous = state["logp"]
        if previous.shape[1] == 0:  # exit 0: nothing to compare with yet
            run = torch.zeros_like(state["run"])
        else:
            small = divergence(previous, logp, self.params["divergence"]) < self.value
            run = torch.where(small, state["run"] + 1, torch.zeros_like(state["run"]))
        return run >= int(self.params["patience"]), {"logp": logp, "run": run}

    def grid(self, num_exits: int) -> list[float]:
        # Divergences between trained adjacent exits are mostly tiny: 0 (never), then
        # geometric steps from 1e-6 to 1 nat.
        return [0.0] + [round(10 ** (-6 + 6 * i / 99), 9) for i in range(100)]

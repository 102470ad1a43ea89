"""``dact``: DACT's halting units (Eyzaguirre & Soto, CVPR 2020, sec. 3; DACT-BERT, Eyzaguirre,
del Río, Araujo & Soto, 2021, sec. 3), one per exit.

At exit k a halting unit maps the exit's representation to ``h_k = sigmoid(w_k . f_k + b_k)``
in (0, 1), one value per row. In DACT, ``h_k`` multiplies into the running product
``p_k = h_1 ... h_k``, the probability mass later exits still get in the accumulated answer
(:mod:`exitwise.policies.dact`), so a *low* ``h_k`` is what makes a row stop: it is the
probability of going on, not of halting.

Reference: ``DACTWrapper`` in ceyzaguirre4/DACT-MAC (``model.py``), the authors' DACT code: the
gate is one linear layer (``MEMORY_GATE_DIMS = []``, no dropout) with a Xavier-uniform weight
and a zero bias, and the halting value is ``h_n = 1 - sigmoid(gate(x) + 1.0)`` (the fixed
``MEMORY_GATE_BIAS``). That is ``sigmoid(-gate(x) - 1)``: the same family as here, with the
sign folded into the weight (a Xavier-uniform draw is symmetric) and the offset into the
bias, which therefore starts at ``init_bias = -1`` (``h`` about 0.27 at the start).

What the unit reads: DACT-BERT's halting unit and intermediate classifier read each block's
[CLS] representation; here the unit reads the exit head's *feature*, the input of its
classifier layer (the [CLS] hidden state for the ``linear`` head, the pooled [CLS] for
``pooler``), as every exit scorer does (:mod:`exitwise.heads.scorer`).

Deviations: the authors' DACT-BERT code was not found (only DACT-MAC, followed here); a
recurrent DACT-MAC has one gate for all steps, a stack of BERT blocks has one unit per exit
(DACT-BERT adds a halting unit after every block), so the exits' features may differ in width.
"""

from __future__ import annotations

import torch
from torch import nn

from .scorer import ExitScorer, register_scorer


@register_scorer("dact")
class DACTScorer(ExitScorer):
    """Per exit k: ``h_k = sigmoid(Linear_k(feature_k))``, (B, D_k) -> (B,)."""

    def __init__(self, feature_dims: list[int], num_labels: int,
                 init_bias: float = -1.0) -> None:
        super().__init__(feature_dims, num_labels, init_bias=float(init_bias))
        self.units = nn.ModuleList(nn.Linear(d, 1) for d in self.feature_dims)
        for unit in self.units:  # DACT-MAC's ``linear`` helper: Xavier weight, fixed bias
            nn.init.xavier_uniform_(unit.weight)
            nn.init.constant_(unit.bias, float(init_bias))

    def forward(self, k: int, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        x = feature.to(self.units[k].weight.dtype)  # a half-precision model's own precision
        return torch.sigmoid(self.units[k](x).float()).squeeze(-1)

    def scorer_flops(self, k: int, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), 2.0 * self.feature_dims[k], dtype=torch.float64)

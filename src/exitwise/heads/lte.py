"""``lte``: BERxiT's learning-to-exit module (Xin et al., EACL 2021, sec. 3.2).

One linear layer shared by all exits plus a sigmoid, over each exit's pooled feature (the
input of the exit's classifier): ``u_k = sigmoid(w . h_k + b)``, one score per row in (0, 1).
Reference: ``BertEncoder.init_lte`` / ``forward`` in castorini/berxit
(``transformers/modeling_highway_bert.py``): ``lte_classifier = nn.Linear(hidden, 1)``,
``lte_activation = nn.Sigmoid()``, read on ``highway_exit[1]`` (the highway's pooled output).

Here the score is a *certainty* (high = the exit is right), as the paper writes it; how it is
trained and the direction of the exit rule are in :mod:`exitwise.training.berxit` and the
``lte`` policy. Sharing one layer across exits needs every exit's feature to have the same
width (true for exits of one encoder with the same head kind); otherwise construction fails.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .scorer import ExitScorer, register_scorer


@register_scorer("lte")
class LTEScorer(ExitScorer):
    def __init__(self, feature_dims: list[int], num_labels: int) -> None:
        super().__init__(feature_dims, num_labels)
        if len(set(self.feature_dims)) != 1:
            raise ConfigError(
                "BERxiT's learning-to-exit module is one linear layer shared by all exits, so "
                f"every exit's feature must have one width; got {self.feature_dims}"
            )
        self.linear = nn.Linear(self.feature_dims[0], 1)

    def forward(self, k: int, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # in the layer's own precision (a half-precision model), the score in float32
        x = feature.to(self.linear.weight.dtype)
        return torch.sigmoid(self.linear(x).float()).squeeze(-1)

    def scorer_flops(self, k: int, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), 2.0 * self.feature_dims[0], dtype=torch.float64)

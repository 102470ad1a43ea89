"""The cheap weight summary of ``exitwise.checkpoint`` (cache keys, saved folders' checks),
against values computed by hand."""

from __future__ import annotations

import torch
from torch import nn

from exitwise.checkpoint import same_weights, weights_fingerprint


def _linear() -> nn.Linear:
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([0.5, -1.0]))
    return layer


def test_fingerprint_by_hand():
    # parameter n (from 1) weighs n: weight sums 6 (|.| 10), bias -0.5 (|.| 1.5)
    assert weights_fingerprint(_linear()) == [1 * 6 + 2 * -0.5, 1 * 10 + 2 * 1.5]
    # two values per parameter at most: the weight's every second value (1, 3), the bias whole
    assert weights_fingerprint(_linear(), per_param=2) == [1 * 4 + 2 * -0.5, 1 * 4 + 2 * 1.5]
    assert weights_fingerprint(nn.ReLU()) == [0.0, 0.0]


def test_a_lower_precision_copy_has_the_same_weights_another_does_not():
    base = weights_fingerprint(_linear())
    assert same_weights(base, weights_fingerprint(_linear().to(torch.bfloat16)))
    other = _linear()
    with torch.no_grad():
        other.weight[0, 0] += 0.5
    assert not same_weights(base, weights_fingerprint(other))

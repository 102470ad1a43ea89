"""SmartBERT's skipping gate and exit classifier (``heads/smartbert.py``): the gate's
probability and decision against values computed by hand, padding ignored, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import exitwise as ew
from exitwise.heads import build_gate
from exitwise.heads.smartbert import SmartBERTGate


def hand_gate() -> SmartBERTGate:
    """One 2-wide block, a 2-wide gate with one attention head; weights set by hand:
    proj, query, key and value identities without bias, output layer w = (1, -2), b = 0.1."""
    gate = build_gate("smartbert", [2], width=2, num_heads=1, dropout=0.0)
    eye = torch.eye(2)
    with torch.no_grad():
        for lin in (gate.proj[0], gate.attention[0].query, gate.attention[0].key,
                    gate.attention[0].value):
            lin.weight.copy_(eye)
            lin.bias.zero_()
        gate.out[0].weight.copy_(torch.tensor([[1.0, -2.0]]))
        gate.out[0].bias.fill_(0.1)
    return gate.eval()


def by_hand(tokens: list[list[float]]) -> float:
    """x_j = tanh(h_j); p_j = softmax_j(x_0 . x_j / sqrt(2)); c = sum_j p_j x_j;
    probability = sigmoid(c . (1, -2) + 0.1)."""
    x = [[math.tanh(v) for v in t] for t in tokens]
    s = [sum(a * b for a, b in zip(x[0], xj)) / math.sqrt(2) for xj in x]
    z = sum(math.exp(v) for v in s)
    p = [math.exp(v) / z for v in s]
    c = [sum(pj * xj[d] for pj, xj in zip(p, x)) for d in range(2)]
    return 1 / (1 + math.exp(-(c[0] - 2 * c[1] + 0.1)))


def test_gate_probability_and_decision_by_hand():
    gate = hand_gate()
    real = [[0.5, -1.0], [2.0, 0.3]]
    hidden = torch.tensor([real + [[9.0, -9.0]], [[0.2, 0.4], [-0.7, 1.5], [0.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    want = [by_hand(real), by_hand(hidden[1].tolist())]
    with torch.no_grad():
        got = gate(0, hidden, mask)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # skip when the probability reaches the threshold: one row each side of it
    gate.threshold = (want[0] + want[1]) / 2
    assert gate.skip(0, hidden, mask).tolist() == [want[0] >= want[1], want[1] > want[0]]
    gate.threshold = float(got.min())  # exactly the lower probability
    assert gate.skip(0, hidden, mask).tolist() == [True, True]  # ">=": equal skips
    gate.threshold = 1.5  # above 1: never skips
    assert not gate.skip(0, hidden, mask).any()
    # padding is not read: another padded token changes nothing
    noisy = hidden.clone()
    noisy[0, 2] = torch.tensor([-50.0, 3.0])
    torch.testing.assert_close(gate(0, noisy, mask), got)


def test_gate_cost_and_options():
    gate = hand_gate()
    n = torch.tensor([[1, 1, 0], [1, 1, 1]])
    flops = gate.gate_flops(0, n, 2)
    assert flops.dtype == torch.float64 and flops[1] > flops[0] > 0
    assert gate.options == {"threshold": 0.5, "width": 2, "num_heads": 1, "dropout": 0.0}
    with pytest.raises(ew.ConfigError, match="threshold"):
        gate.threshold = 0.0
    with pytest.raises(ew.ConfigError, match="bad options for skip gate"):
        build_gate("smartbert", [2], gate_size=3)
    with pytest.raises(ew.ConfigError, match="multiple"):
        build_gate("smartbert", [2], width=6, num_heads=4)
    with pytest.raises(ew.ConfigError, match="unknown skip gate"):
        build_gate("nope", [2])


def test_head_reads_its_token_states_and_one_gate_per_model():
    torch.manual_seed(0)
    head = ew.build_head("smartbert", 8, 3, dropout=0.0, width=16).eval()
    hidden, mask = torch.randn(2, 5, 8), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    tokens, same = head.token_states(hidden, mask)
    torch.testing.assert_close(tokens, torch.tanh(head.proj(hidden)))
    assert same is mask
    pooled = torch.tanh(head.dense(head.attention(tokens, mask)))
    torch.testing.assert_close(head(hidden, mask), head.classifier(pooled))
    blocks = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 4)),
                            ew.ExitConfig(layers="all", head="linear", num_labels=2))
    model.attach_gate("smartbert")
    assert model.attach_gate("smartbert") is model.gate
    with pytest.raises(ew.InputError, match="already has"):
        model.attach_gate("other")

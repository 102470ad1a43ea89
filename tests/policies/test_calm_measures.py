"""CALM's confidence measures against hand-computed values: ``calm_softmax`` is the softmax
response p1 - p2 (``calm_top2`` an alias), ``calm_maxprob`` the top-1 probability, and the
paper's decaying threshold lambda_t = clip(0.9 lambda + 0.1 exp(-tau t / N), 0, 1)."""

from __future__ import annotations

import math

import pytest
import torch

import exitwise as ew
from exitwise.policies.calm_softmax import CalmSoftmaxPolicy
from exitwise.policies.calm_top2 import CalmTop2Policy

PROBS = [[0.5, 0.3, 0.2], [0.45, 0.44, 0.11], [0.9, 0.06, 0.04]]


def logits():
    return torch.log(torch.tensor(PROBS))


def test_softmax_response_is_the_top2_gap():
    gaps = [0.5 - 0.3, 0.45 - 0.44, 0.9 - 0.06]
    for name in ("calm_softmax", "calm_top2"):
        policy = ew.get_policy(name, threshold=0.1, tau=0.0)  # lambda_t = 0.09 + 0.1 = 0.19
        torch.testing.assert_close(policy.measure(logits(), {}), torch.tensor(gaps))
        assert policy.decide(0, 3, logits(), {})[0].tolist() == [True, False, True]
    # 0.9 lambda + 0.1 = 0.82 at lambda = 0.8: only the third row's gap 0.84 passes ...
    strict = ew.get_policy("calm_softmax", threshold=0.8, tau=0.0)
    assert strict.decide(0, 3, logits(), {})[0].tolist() == [False, False, True]
    # ... while its top-1 probability (0.9) and the first row's (0.5) are what maxprob reads
    top1 = ew.get_policy("calm_maxprob", threshold=0.4, tau=0.0)  # lambda_t = 0.46
    torch.testing.assert_close(top1.measure(logits(), {}), torch.tensor([0.5, 0.45, 0.9]))
    assert top1.decide(0, 3, logits(), {})[0].tolist() == [True, False, True]


def test_calm_top2_is_an_alias_of_calm_softmax():
    assert issubclass(CalmTop2Policy, CalmSoftmaxPolicy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 7, generator=g) * 3
    t = torch.randint(0, 20, (64,), generator=g).float()
    a = ew.get_policy("calm_softmax", threshold=0.3, tau=4.0, horizon=20.0)
    b = ew.get_policy("calm_top2", threshold=0.3, tau=4.0, horizon=20.0)
    assert torch.equal(a.decide(0, 3, x, {"t": t})[0], b.decide(0, 3, x, {"t": t})[0])
    assert b.to_dict()["name"] == "calm_top2"  # a saved dict keeps the name it was saved with


@pytest.mark.parametrize("threshold, tau, t, horizon", [(0.7, 4.0, 5.0, 10.0), (0.2, 1.0, 0.0, 8.0),
                                                       (1.0, 4.0, 30.0, 30.0)])
def test_decaying_threshold_by_hand(threshold, tau, t, horizon):
    """The paper's schedule (not the t5x code's lambda * (0.9 + 0.1 exp(...)))."""
    lam = min(1.0, max(0.0, 0.9 * threshold + 0.1 * math.exp(-tau * t / horizon)))
    policy = ew.get_policy("calm_softmax", threshold=threshold, tau=tau, horizon=horizon)
    got = policy.threshold_at({"t": torch.tensor([t])}, 1, "cpu")
    assert float(got) == pytest.approx(lam, abs=1e-6)
    # two classes: the gap is 2 p - 1; just above lambda_t exits, just below does not
    gaps = [g for g in (lam + 0.02, lam - 0.02) if 0.0 < g < 1.0]
    rows = torch.log(torch.tensor([[(1 + g) / 2, (1 - g) / 2] for g in gaps]))
    state = {"t": torch.full((len(gaps),), t)}
    assert policy.decide(0, 3, rows, state)[0].tolist() == [g > lam for g in gaps]


def test_threshold_one_with_no_decay_never_exits():
    sure = torch.tensor([[60.0, 0.0, 0.0]])  # p1 - p2 = 1 - ~1e-26: rounds to 1.0
    for name in ("calm_softmax", "calm_maxprob"):
        assert not ew.get_policy(name, threshold=1.0, tau=0.0).decide(0, 3, sure, {})[0].any()

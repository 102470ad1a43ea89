"""FREE's adaptive threshold estimator: the Beta-mixture EM steps and the threshold rule against
values computed by hand (plain Python, ``math`` only), and the ``free_bmm`` decision rule."""

from __future__ import annotations

import math

import pytest
import torch

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.policies.free_bmm import BetaMixture, FreeBMMPolicy, beta_pdf, fit_beta_weighted


def pdf(x: float, a: float, b: float) -> float:
    return math.exp((a - 1) * math.log(x) + (b - 1) * math.log(1 - x)
                    + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))


def moments(x: list[float], w: list[float]) -> tuple[float, float]:
    m = sum(wi * xi for wi, xi in zip(w, x)) / sum(w)
    v = sum(wi * (xi - m) ** 2 for wi, xi in zip(w, x)) / sum(w)
    a = m * (m * (1 - m) / v - 1)
    return a, a * (1 - m) / m


def grid_threshold(alphas, betas, lo=0.3, hi=0.9, res=10, zeta=0.4) -> float:
    xs = [lo + j * (hi - lo) / (res - 1) for j in range(res)]
    k = 1 if alphas[1] / (alphas[1] + betas[1]) > alphas[0] / (alphas[0] + betas[0]) else 0
    n = sum(pdf(x, alphas[k], betas[k])
            / (pdf(x, alphas[k], betas[k]) + pdf(x, alphas[1 - k], betas[1 - k])) > zeta
            for x in xs)
    return xs[min(max(0, res - n), res - 1)]


def test_beta_pdf_and_moment_fit():
    x = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(beta_pdf(x, 2.0, 5.0),
                               torch.tensor([pdf(v, 2.0, 5.0) for v in x.tolist()],
                                            dtype=torch.float64))
    # Beta(2, 5) at 0.1 = 30 * 0.1 * 0.9^4
    assert float(beta_pdf(torch.tensor([0.1]), 2.0, 5.0)) == pytest.approx(30 * 0.1 * 0.9 ** 4)
    xs, ws = [0.2, 0.4, 0.5, 0.9], [1.0, 2.0, 1.0, 0.5]
    assert fit_beta_weighted(torch.tensor(xs), torch.tensor(ws)) == pytest.approx(moments(xs, ws))


def test_threshold_rule_by_hand():
    # Beta(5, 2) consistent vs Beta(2, 5): ratio x^3 / (x^3 + (1-x)^3) > 0.4 <=> x > 0.4663,
    # true at 7 of the 10 grid points 0.3, 0.367, ..., 0.9 -> x[10 - 7] = 0.5
    bmm = BetaMixture(alphas=(2.0, 5.0), betas=(5.0, 2.0))
    assert bmm.threshold() == pytest.approx(0.5)
    assert grid_threshold((2.0, 5.0), (5.0, 2.0)) == pytest.approx(0.5)
    # "consistent" is the component with the larger mean, whichever index it has
    assert BetaMixture(alphas=(5.0, 2.0), betas=(2.0, 5.0)).threshold() == pytest.approx(0.5)
    # a stricter zeta needs a larger ratio: 0.8 <=> x/(1-x) > 4^(1/3) = 1.587 <=> x > 0.6135
    # -> 5 grid points (0.633 .. 0.9) -> x[5] = 0.6333
    assert bmm.threshold(zeta=0.8) == pytest.approx(0.3 + 5 * 0.6 / 9)
    # nothing above zeta: the top of the range; everything: the bottom
    assert bmm.threshold(zeta=0.9999) == pytest.approx(0.9)
    assert bmm.threshold(zeta=0.0) == pytest.approx(0.3)


def test_supervised_em_step_by_hand():
    """Responsibilities from the labels (0.2 for the labelled component, floored 1e-4 for the
    other, normalised), then a weighted moment fit per component; weights unchanged."""
    x = [0.2, 0.4, 0.6, 0.8, 0.7]
    y = [0, 0, 1, 1, 1]
    norm = 0.2 + 1e-4
    r1 = [(0.2 if yi == 1 else 1e-4) / norm for yi in y]
    r0 = [(0.2 if yi == 0 else 1e-4) / norm for yi in y]
    a0, b0 = moments(x, r0)
    a1, b1 = moments(x, r1)
    bmm = BetaMixture().fit(torch.tensor(x, dtype=torch.float64), torch.tensor(y))
    assert bmm.alphas == pytest.approx([a0, a1], rel=1e-9)
    assert bmm.betas == pytest.approx([b0, b1], rel=1e-9)
    assert bmm.weights == [0.5, 0.5]
    # ... and the policy's threshold after a refit is this mixture's grid threshold
    policy = ew.get_policy("free_bmm")
    policy.observe(torch.tensor(x, dtype=torch.float64), torch.tensor(y).bool())
    assert policy.current_threshold == 0.9  # not fitted yet: the fixed threshold
    policy.begin_sequence()
    assert policy.estimated == pytest.approx(grid_threshold((a0, a1), (b0, b1)))
    assert policy.current_threshold == policy.estimated and policy.updates == 1


def test_unsupervised_em_step_by_hand():
    """E-step with the mixture's posterior, M-step by moments, every parameter averaged with
    lam = 0.95 towards the fit."""
    x = [0.1, 0.3, 0.55, 0.8, 0.95]
    a, b, w = [1.0, 2.0], [2.0, 1.0], [0.5, 0.5]
    resp = []
    for xi in x:
        r = [max(w[k] * pdf(xi, a[k], b[k]), 1e-4) for k in range(2)]
        resp.append([v / (sum(r) + 1e-12) for v in r])
    fits = [moments(x, [r[k] for r in resp]) for k in range(2)]
    new_w = [sum(r[k] for r in resp) for k in range(2)]
    new_w = [v / (sum(new_w) + 1e-12) for v in new_w]
    bmm = BetaMixture().fit(torch.tensor(x, dtype=torch.float64))
    assert bmm.alphas == pytest.approx([0.95 * a[k] + 0.05 * fits[k][0] for k in range(2)])
    assert bmm.betas == pytest.approx([0.95 * b[k] + 0.05 * fits[k][1] for k in range(2)])
    assert bmm.weights == pytest.approx([0.95 * w[k] + 0.05 * new_w[k] for k in range(2)])


def test_data_at_0_and_1_are_clipped():
    bmm = BetaMixture().fit(torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert all(math.isfinite(v) and v > 0 for v in bmm.alphas + bmm.betas)


def test_decision_rule_and_online_updates():
    # gaps 0.8, 0.3, 0.05: exit at the shallow exit iff the gap is above the threshold
    probs = torch.tensor([[0.85, 0.05, 0.1], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    logits = probs.log()
    policy = ew.get_policy("free_bmm", threshold=0.25)
    done, state = policy.decide(0, 2, logits, policy.init_state(3))
    assert done.tolist() == [True, True, False]
    torch.testing.assert_close(state["shallow_conf"], torch.tensor([0.75, 0.3, 0.05]))
    # past the shallow exit nobody leaves early: the deep model decides
    assert not policy.decide(1, 3, logits, state)[0].any()
    # an estimate replaces the fixed threshold; adaptive=False ignores the data
    policy.estimated = 0.5
    assert policy.decide(0, 2, logits, policy.init_state(3))[0].tolist() == [True, False, False]
    fixed = ew.get_policy("free_bmm", threshold=0.25, adaptive=False)
    fixed.observe(torch.tensor([0.2, 0.9]), torch.tensor([False, True]))
    fixed.begin_sequence()
    assert fixed.estimated is None and fixed.current_threshold == 0.25
    # at most max_updates fits
    capped = ew.get_policy("free_bmm", max_updates=1)
    capped.observe(torch.tensor([0.2, 0.4, 0.7, 0.9]), torch.tensor([0, 0, 1, 1]).bool())
    capped.begin_sequence()
    first = capped.estimated
    capped.observe(torch.tensor([0.95] * 20), torch.ones(20, dtype=torch.bool))
    capped.begin_sequence()
    assert capped.updates == 1 and capped.estimated == first
    assert isinstance(capped, FreeBMMPolicy) and capped.num_observed == 24


def test_bad_parameters():
    for kwargs in ({"zeta": 1.5}, {"lo": 0.8, "hi": 0.5}, {"resolution": 1},
                   {"max_updates": -1}, {"threshold": 2.0}):
        with pytest.raises(ConfigError):
            ew.get_policy("free_bmm", **kwargs)

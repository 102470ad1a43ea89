"""The vision literature's policies: ZTW ensemble confidence, window cascades, MSDNet budgets.

(The shared contract in test_policy_contract.py covers their shapes, state, per-row
independence and round trips; here: what each one decides, checked against hand computation,
and runtime == replay with non-default settings on a tiny CNN.)
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.cnn import sdn_cnn_with_cache

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, replay
from exitwise.calibration.budget import (
    expected_cost,
    fit_budget_policy,
    geometric_fractions,
    realized_cost,
    solve_q,
    thresholds_for_fractions,
    top_probabilities,
)
from exitwise.errors import ConfigError
from exitwise.analysis import ztw_cache
from exitwise.policies import ztw_ensemble


# -- ZTW -------------------------------------------------------------------------------------
def test_ztw_default_is_the_product_of_the_exits_so_far():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(6, 3, generator=g) * 2, torch.randn(6, 3, generator=g) * 2
    policy = ew.get_policy("ztw", threshold=0.8)
    state = policy.init_state(6)
    done0, state = policy.decide(0, 3, z0, state)
    assert torch.equal(done0, torch.softmax(z0, -1).amax(-1) >= 0.8)
    done1, state = policy.decide(1, 3, z1, state)
    product = torch.softmax(z0, -1) * torch.softmax(z1, -1)
    ens = product / product.sum(-1, keepdim=True)
    assert torch.equal(done1, ens.amax(-1) >= 0.8)
    assert state["logp"].shape == (6, 2, 3)


def test_ztw_weights_and_per_class_biases():
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(8, 4, generator=g) for _ in range(3)]
    weights = [[1.0], [0.3, 1.2], [0.1, 0.5, 2.0]]
    biases = [[0.0] * 4, [0.5, -0.5, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]]
    policy = ew.get_policy("ztw", threshold=0.6, weights=weights, biases=biases)
    logp = [torch.log_softmax(x, -1) for x in z]
    expected = [
        torch.log_softmax(sum(w * logp[j] for j, w in enumerate(weights[k]))
                          + torch.tensor(biases[k]), -1)
        for k in range(3)
    ]
    state = policy.init_state(8)
    for k in range(2):
        # output_logits reads the state *before* decide, as the executor would at an exit.
        torch.testing.assert_close(policy.output_logits(k, 3, z[k], state), expected[k])
        done, state = policy.decide(k, 3, z[k], state)
        assert torch.equal(done, expected[k].exp().amax(-1) >= 0.6)
    torch.testing.assert_close(policy.output_logits(2, 3, z[2], state), expected[2])
    # The offline version over a whole (N, E, C) tensor agrees.
    torch.testing.assert_close(ztw_ensemble(torch.stack(z, 1), weights, biases),
                               torch.stack(expected, 1))


def test_ztw_scalar_biases_cancel_and_square_matrices_are_trimmed():
    z = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(2))
    tri = [[1.0], [0.5, 1.0], [0.2, 0.3, 1.0]]
    square = [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.2, 0.3, 1.0]]
    base = ztw_ensemble(z, tri)
    torch.testing.assert_close(ztw_ensemble(z, tri, [3.0, -1.0, 7.0]), base)
    policy = ew.get_policy("ztw", weights=square, bias=[[0.0] * 3] * 3)  # GeometricEnsemble.to_dict
    assert policy.params["weights"] == tri
    with pytest.raises(ConfigError, match="above the diagonal"):
        ew.get_policy("ztw", weights=[[1.0, 0.5], [0.5, 1.0]])


@pytest.mark.parametrize("params", [
    {"weights": [[1.0], [1.0]]},
    {"weights": [[1.0], [1.0, float("nan")]]},
    {"weights": [[1.0], [1.0, 1.0]], "biases": [0.0]},
    {"weights": [[1.0]], "biases": [[0.0, 1.0], [0.0]]},
    {"biases": [0.0], "bias": [0.0]},
])
def test_ztw_bad_weights(params):
    with pytest.raises(ConfigError):
        ew.get_policy("ztw", **params)


def test_ztw_weights_for_another_number_of_exits():
    policy = ew.get_policy("ztw", weights=[[1.0], [1.0, 1.0]])
    with pytest.raises(ConfigError, match="2 exits"):
        policy.decide(0, 4, torch.zeros(2, 3), policy.init_state(2))


def test_ztw_cache_replays_as_confidence():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 4, 5, generator=g) * 2
    cache = ExitLogitsCache(logits, torch.randint(0, 5, (40,), generator=g),
                            torch.tensor([1.0, 2, 3, 4]).repeat(40, 1), torch.full((40,), 4.0),
                            [1, 2, 3, 4])
    weights = [[1.0], [0.5, 1.0], [0.3, 0.3, 1.0], [0.2, 0.2, 0.2, 1.0]]
    temps = [2.0, 1.0, 0.5, 1.0]
    policy = ew.get_policy("ztw", threshold=0.7, weights=weights)
    direct = replay(policy, cache, temps)
    ens = ztw_cache(cache, policy, temps)
    via = replay(ew.get_policy("confidence", threshold=0.7), ens)
    assert torch.equal(direct.exit_index, via.exit_index)
    assert 0 < int((direct.exit_index < 3).sum()) < 40  # mixed decisions
    rows = torch.arange(40)
    expected = ztw_ensemble(logits, weights, None, temps)[rows, via.exit_index].argmax(-1)
    assert torch.equal(via.predictions, expected)


# -- window ----------------------------------------------------------------------------------
def test_window_passes_on_only_inside_the_window():
    # Three rows: confident, middling, uniform (maximally uncertain), C = 4.
    logits = torch.tensor([[9.0, 0, 0, 0], [1.0, 0.5, 0, 0], [0.0, 0, 0, 0]])
    policy = ew.get_policy("window", low=0.1, high=0.95)
    u = policy.uncertainty(logits)
    assert u[0] < 0.1 < u[1] < 0.95 < u[2] and math.isclose(float(u[2]), 1.0, abs_tol=1e-6)
    done, state = policy.decide(0, 3, logits, policy.init_state(3))
    assert done.tolist() == [True, False, True]
    assert state["rejected"].tolist() == [False, False, True]
    assert policy.rejected(logits).tolist() == [False, False, True]
    # Without an upper edge, the uniform row keeps going (a plain entropy cascade).
    done, _ = ew.get_policy("window", low=0.1).decide(0, 3, logits, policy.init_state(3))
    assert done.tolist() == [True, False, False]


def test_window_max_prob_measure_and_tuning_the_high_edge():
    logits = torch.tensor([[2.0, 0.0], [0.2, 0.0]])
    policy = ew.get_policy("window", low=0.0, high=0.3, measure="max_prob", tune="high")
    p = torch.softmax(logits, -1).amax(-1)
    torch.testing.assert_close(policy.uncertainty(logits), 1 - p)
    assert policy.param == "high" and policy.value == 0.3
    assert policy.with_param(0.5).params["high"] == 0.5
    assert all(v >= 0.0 for v in policy.grid(3)) and max(policy.grid(3)) == 1.0
    low_grid = ew.get_policy("window", low=0.1, high=0.4).grid(3)
    assert max(low_grid) <= 0.4


@pytest.mark.parametrize("params", [
    {"low": 0.6, "high": 0.4}, {"low": -0.1}, {"high": 1.5}, {"measure": "margin"},
    {"tune": "middle"},
])
def test_window_bad_parameters(params):
    with pytest.raises(ConfigError):
        ew.get_policy("window", **params)


def test_window_low_above_high_via_with_param():
    with pytest.raises(ConfigError, match="exceed"):
        ew.get_policy("window", low=0.1, high=0.5).with_param(0.7)


# -- MSDNet budget ---------------------------------------------------------------------------
def test_solve_q_meets_the_budget():
    costs = torch.tensor([0.25, 0.5, 0.75, 1.05])
    for budget in (0.3, 0.5, 0.8, 1.0):
        q = solve_q(budget, costs)
        assert expected_cost(q, costs) == pytest.approx(budget, abs=1e-9)
    assert solve_q(0.4, costs) < solve_q(0.6, costs)  # more budget, more weight on deep exits
    assert math.isinf(solve_q(1.05, costs))
    fractions = geometric_fractions(0.5, 4)
    torch.testing.assert_close(fractions[1:] / fractions[:-1], torch.full((3,), 0.5,
                                                                          dtype=torch.float64))
    with pytest.raises(ConfigError, match="cheapest"):
        solve_q(0.2, costs)
    with pytest.raises(ConfigError, match="increase"):
        solve_q(0.5, torch.tensor([0.5, 0.4, 1.0]))


def test_threshold_walk_hits_the_fractions():
    top = torch.rand(1000, 4, generator=torch.Generator().manual_seed(4)) * 0.6 + 0.4
    fractions = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    thresholds = thresholds_for_fractions(top, fractions)
    policy = ew.get_policy("budget", budget=0.5, budgets=[0.5], thresholds=[thresholds])
    left = torch.zeros(1000, dtype=torch.bool)
    counts = []
    for k, t in enumerate(thresholds):
        out = ~left & (top[:, k] >= t)
        counts.append(int(out.sum()))
        left |= out
    assert counts == [400, 300, 200]  # continuous scores: no ties, exactly floor(N * pi_k)
    assert policy.active_thresholds == thresholds


def _budget_cache(n: int = 600, seed: int = 5) -> ExitLogitsCache:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    # Deeper exits are more often right and more confident.
    logits = torch.randn(n, 4, 5, generator=g)
    for k in range(4):
        logits[torch.arange(n), k, labels] += 0.8 * (k + 1)
    costs = torch.tensor([0.3, 0.55, 0.8, 1.02], dtype=torch.float64).repeat(n, 1)
    return ExitLogitsCache(logits, labels, costs, torch.ones(n, dtype=torch.float64),
                           [1, 2, 3, 4])


def test_fit_budget_policy_spends_the_budget_on_heldout():
    cache = _budget_cache()
    fit = fit_budget_policy(cache, [0.4, 0.6, 0.9])
    for point in fit.points:
        assert point["heldout"]["relative_compute"] == pytest.approx(point["budget"], abs=0.01)
        assert point["heldout"]["exit_fractions"][:3] == pytest.approx(
            point["target_fractions"][:3], abs=2 / cache.num_examples)
    accs = [p["heldout"]["accuracy"] for p in fit.points]
    assert accs[0] < accs[-1]
    policy = fit.policy
    assert policy.grid(4) == [0.4, 0.6, 0.9] and policy.value == 0.9
    # In-between budgets use the largest fitted budget below them; below all is an error.
    assert policy.with_param(0.75).active_thresholds == policy.with_param(0.6).active_thresholds
    with pytest.raises(ConfigError, match="below every fitted budget"):
        policy.with_param(0.3)
    again = ew.policies.policy_from_dict(policy.to_dict())
    assert again.to_dict() == policy.to_dict()
    with pytest.raises(ConfigError, match="fitted for 4 exits"):
        policy.decide(0, 3, torch.zeros(2, 5), {})


def test_rows_of_several_costs_spend_the_budget_not_more():
    """Length-dependent costs where the confident rows are the short ones: the geometric law
    (one mean cost per exit) put its exit counts on the cheap rows, so the long rows went deep
    and the held-out cost overran the budget it was fitted for."""
    base = _budget_cache()
    top = torch.softmax(base.logits[:, 0], -1).amax(-1)
    rank = top.argsort().argsort().double() / (base.num_examples - 1)
    length = 100.0 - 90.0 * rank  # the most confident row is 10 tokens, the least 100
    costs = length[:, None] * torch.tensor([0.3, 0.55, 0.8, 1.02], dtype=torch.float64)
    cache = ExitLogitsCache(base.logits, base.labels, costs, length, [1, 2, 3, 4])
    budgets = [0.4, 0.6, 0.9]
    law = [thresholds_for_fractions(top_probabilities(cache), geometric_fractions(
        solve_q(b, cache.costs.mean(0) / cache.full_cost.mean()), 4)) for b in budgets]
    assert realized_cost(top_probabilities(cache), law[0],
                         cache.costs / cache.full_cost.mean()) > 0.45  # the overrun
    fit = fit_budget_policy(cache, budgets)
    for point in fit.points:
        spent = point["heldout"]["relative_compute"]
        assert point["budget"] - 0.01 <= spent <= point["budget"] + 1e-9
    # one cost for every row: the law's own thresholds, as before
    assert fit_budget_policy(base, budgets).points[0]["q"] == pytest.approx(
        solve_q(0.4, base.costs.mean(0) / base.full_cost.mean()))


def test_unfitted_budget_policy():
    policy = ew.get_policy("budget")
    done, _ = policy.decide(0, 3, torch.tensor([[50.0, 0.0]]), {})
    assert not bool(done.any())
    with pytest.raises(ConfigError, match="fit_budget_policy"):
        ew.get_policy("budget", budget=0.5)
    with pytest.raises(ConfigError, match="both"):
        ew.get_policy("budget", budgets=[0.5])


# -- runtime == replay with fitted / non-default settings on a tiny CNN ----------------------
@pytest.fixture(scope="module")
def cnn():
    return sdn_cnn_with_cache()


def test_fitted_policies_agree_between_runtime_and_replay(cnn):
    model, x, cache = cnn
    fit = fit_budget_policy(cache, [0.5, 0.8])
    rel = cache.costs.mean(0) / cache.full_cost.mean()
    assert rel[0] < 0.5
    policies = [
        fit.policy.with_param(0.5),
        ew.get_policy("window", low=0.3, high=0.9),
        ew.get_policy("ztw", threshold=0.9, weights=[[1.0], [0.5, 1.0], [0.2, 0.4, 1.0],
                                                     [0.1, 0.2, 0.3, 1.0]]),
    ]
    for policy in policies:
        live = model.early_exit(policy, pixel_values=x)
        offline = replay(policy, cache, model.temperatures)
        assert torch.equal(live.exit_index, offline.exit_index), policy
        assert torch.equal(live.predictions, offline.predictions), policy
        assert len(set(live.exit_index.tolist())) >= 2, policy  # not a trivial agreement


def test_ztw_runtime_returns_the_ensemble_and_replay_scores_it(cnn):
    """A row leaving at exit k returns ZTW's ensemble log-probabilities at k (not the head's
    own logits), in the executor and in replay alike."""
    model, x, cache = cnn
    weights = [[1.0], [0.5, 1.0], [0.2, 0.4, 1.0], [0.1, 0.2, 0.3, 1.0]]
    policy = ew.get_policy("ztw", threshold=0.9, weights=weights)
    live = model.early_exit(policy, pixel_values=x)
    ens = ztw_ensemble(cache.logits, weights, None, model.temperatures)  # (N, E, C)
    rows = torch.arange(cache.num_examples)
    torch.testing.assert_close(live.logits, ens[rows, live.exit_index], atol=1e-4, rtol=1e-4)
    head_preds = cache.logits[rows, live.exit_index].argmax(-1)
    offline = replay(policy, cache, model.temperatures)
    assert torch.equal(offline.predictions, ens[rows, live.exit_index].argmax(-1))
    assert not torch.equal(offline.predictions, head_preds)  # the ensemble does change answers
    # Selective classification scores what the policy returned (the ensemble), too.
    from exitwise.protocols import selective_classification

    sc = selective_classification(cache, policy, model.temperatures)
    assert sc["accuracy"] == pytest.approx(offline.accuracy)

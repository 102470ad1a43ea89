"""UEE-UCB's learner (Hari Narayan N U et al., AI-ML Systems 2022): the index and the reward
against hand-computed values, the side observations of a played arm, regret on a synthetic
stream that has strong dominance, JSON state round trips, and option errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from exitwise.errors import ConfigError, InputError
from exitwise.policies.uee_ucb import UCBExitSelector, depth_costs, uee_rewards

COSTS = [0.1, 0.3, 0.6]


def test_reward_is_disagreement_with_exit_0_plus_cost_saved_against_exit_0():
    # row 0: exits predict 1, 1, 0; row 1: 2, 0, 2
    r = uee_rewards(torch.tensor([[1, 1, 0], [2, 0, 2]]), COSTS)
    expected = torch.tensor([[0.0, 0 + 0.1 - 0.3, 1 + 0.1 - 0.6],
                             [0.0, 1 + 0.1 - 0.3, 0 + 0.1 - 0.6]], dtype=torch.float64)
    torch.testing.assert_close(r, expected)
    # the selector returns the played arm's column
    sel = UCBExitSelector(COSTS)
    torch.testing.assert_close(sel.update(1, torch.tensor([[1, 1], [2, 0]])), expected[:, 1])


def test_ucb_index_and_choices_by_hand():
    sel = UCBExitSelector(COSTS, alpha=1.0)
    assert sel.select() == 2  # nothing seen yet: the last exit, which observes every exit
    sel.update(2, torch.tensor([[0, 1, 1]]))
    assert (sel.rounds, sel.observed, sel.disagreed) == (1, [1, 1, 1], [0, 1, 1])
    # t = 1: bonus sqrt(log 2 / 1) for every arm
    b = math.sqrt(math.log(2))
    expected = [0 + b, 1 + 0.1 - 0.3 + b, 1 + 0.1 - 0.6 + b]
    assert sel.indices() == pytest.approx(expected, abs=1e-12)
    assert sel.select() == 1  # 1.633 > 1.333 > 0.833
    # playing exit 1 reveals exits 0 and 1 only, which agree here
    sel.update(1, torch.tensor([[0, 0]]))
    assert (sel.rounds, sel.observed, sel.disagreed) == (2, [2, 2, 1], [0, 1, 1])
    log3 = math.log(3)
    expected = [0 + math.sqrt(log3 / 2), 0.5 - 0.2 + math.sqrt(log3 / 2), 1 - 0.5 + math.sqrt(log3)]
    assert sel.indices() == pytest.approx(expected, abs=1e-12)
    assert sel.select() == 2  # 1.548 > 1.041 > 0.741
    assert sel.disagreement() == [0.0, 0.5, 1.0]
    assert sel.mean_rewards() == pytest.approx([0.0, 0.3, 0.5])


def test_ties_go_to_the_shallowest_exit_and_alpha_weighs_the_bonus():
    sel = UCBExitSelector([0.0, 0.0, 0.0])
    sel.update(2, torch.tensor([[4, 4, 4]]))  # no disagreement, equal costs: a three-way tie
    assert sel.select() == 0
    # exit 2 seen once, exits 0 and 1 seen 5 times: a larger alpha makes the bonus of the
    # rarely seen exit win over exit 1's disagreement
    for alpha, best in ((0.01, 1), (4.0, 2)):
        s = UCBExitSelector([0.0, 0.0, 0.0], alpha=alpha)
        s.update(2, torch.tensor([[0, 0, 0]]))
        s.update(1, torch.tensor([[0, 1]] * 4))
        assert s.select() == best, alpha


def test_a_batch_counts_as_that_many_samples():
    one, batch = UCBExitSelector(COSTS), UCBExitSelector(COSTS)
    preds = torch.tensor([[0, 1, 1], [1, 1, 0], [2, 2, 2]])
    for row in preds:
        one.update(2, row[None])
    batch.update(2, preds)
    assert one.state_dict() == batch.state_dict()
    assert batch.observed == [3, 3, 3] and batch.disagreed == [0, 1, 2]


def _sd_stream(n: int, acc: list[float], seed: int = 0) -> torch.Tensor:
    """(n, E) binary predictions with strong dominance: exit j is right iff u < acc[j] for one
    uniform u per sample (acc non-decreasing), so a right exit stays right deeper."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    u = torch.rand(n, generator=g)
    right = u[:, None] < torch.tensor(acc)[None]
    return torch.where(right, y[:, None], 1 - y[:, None]), y


def test_regret_sanity_on_a_strongly_dominant_stream():
    acc = [0.55, 0.90, 0.93, 0.95]
    costs = [0.1, 0.2, 0.5, 1.0]
    total = [1 - a + c for a, c in zip(acc, costs)]  # 0.55, 0.30, 0.57, 1.05
    best = total.index(min(total))
    assert best == 1
    preds, _ = _sd_stream(3000, acc)
    sel = UCBExitSelector(costs)
    arms = []
    for t in range(preds.shape[0]):
        arm = sel.select()
        sel.update(arm, preds[t:t + 1, :arm + 1])
        arms.append(arm)
    counts = torch.bincount(torch.tensor(arms), minlength=4).tolist()
    assert counts.index(max(counts)) == best and counts[best] > 0.9 * len(arms), counts
    # regret grows far slower than a uniformly random choice's (which pays the mean gap,
    # 0.3175, every step)
    regret = sum(total[a] - total[best] for a in arms)
    random_regret = len(arms) * sum(t - total[best] for t in total) / len(total)
    assert regret < 0.05 * random_regret, (regret, random_regret)
    assert arms[-1000:].count(best) > 950
    # the label-free estimates found the error gaps: P(disagree with exit 0) = acc_j - acc_0
    assert sel.disagreement()[1] == pytest.approx(acc[1] - acc[0], abs=0.03)


def test_state_round_trip_resumes_the_same_choices():
    preds, _ = _sd_stream(200, [0.6, 0.8, 0.85, 0.9], seed=3)
    costs = depth_costs([1, 2, 3, 4], scale=0.3)

    def play(sel: UCBExitSelector, rows: range) -> list[int]:
        out = []
        for t in rows:
            arm = sel.select()
            sel.update(arm, preds[t:t + 1, :arm + 1])
            out.append(arm)
        return out

    whole = play(UCBExitSelector(costs, alpha=0.5), range(200))
    first = UCBExitSelector(costs, alpha=0.5)
    head = play(first, range(70))
    saved = json.loads(json.dumps(first.state_dict()))  # through real JSON
    resumed = UCBExitSelector.from_state_dict(saved)
    assert head + play(resumed, range(70, 200)) == whole
    assert len(set(whole)) > 1, whole  # the choices are not constant (the test can fail)
    # load_state_dict into a selector built with the same settings works too
    again = UCBExitSelector(costs, alpha=0.5).load_state_dict(saved)
    assert again.state_dict() == saved


def test_depth_costs_are_the_reference_cs1():
    # the reference's EC-1 configuration: exits after layers 1, 3, 7, 12 of 12
    assert depth_costs([1, 3, 7, 12]) == pytest.approx([1 / 12, 0.25, 7 / 12, 1.0])
    assert depth_costs([2, 4], num_layers=8, scale=0.5) == pytest.approx([0.125, 0.25])


def test_bad_options_and_misuse_raise_clear_errors():
    with pytest.raises(ConfigError, match="at least one arm"):
        UCBExitSelector([])
    for alpha in (0.0, -1.0, math.nan, math.inf, "x"):
        with pytest.raises(ConfigError, match="alpha"):
            UCBExitSelector(COSTS, alpha=alpha)
    with pytest.raises(ConfigError, match="finite"):
        UCBExitSelector([0.1, math.inf])
    with pytest.raises(ConfigError, match="numbers"):
        UCBExitSelector(["a"])
    with pytest.raises(ConfigError, match="at least one exit"):
        depth_costs([])
    with pytest.raises(ConfigError, match=r"\[1, 4\]"):
        depth_costs([0, 4])
    with pytest.raises(ConfigError, match="scale"):
        depth_costs([1, 2], scale=-1.0)
    sel = UCBExitSelector(COSTS)
    with pytest.raises(InputError, match="arm must be"):
        sel.update(3, torch.tensor([[0, 0, 0, 0]]))
    with pytest.raises(InputError, match="arm must be"):
        sel.update(True, torch.tensor([[0, 0]]))
    with pytest.raises(InputError, match="reveals exits 0..1"):
        sel.update(1, torch.tensor([[0, 0, 0]]))  # exit 2 was never computed
    with pytest.raises(InputError, match="class ids"):
        sel.update(1, torch.tensor([[0.2, 0.8]]))
    assert sel.rounds == 0  # nothing half-recorded
    with pytest.raises(ConfigError, match="same settings"):
        UCBExitSelector([0.1, 0.3, 0.7]).load_state_dict(sel.state_dict())
    with pytest.raises(InputError, match="not a UEE-UCB state"):
        sel.load_state_dict({"rounds": 3})
    broken = dict(sel.state_dict(), observed=[1, 0, 0], disagreed=[2, 0, 0], rounds=1)
    with pytest.raises(InputError, match="inconsistent"):
        sel.load_state_dict(broken)

"""``elbert`` (Xie et al. 2021): the entropy stage and the confidence-window stage (rules
``same``, ``rising``, ``stable``) against hand-computed decisions, the two-class reading of the
reference's class-0 window, option checks, runtime == replay, and the regression refusal."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.errors import ConfigError
from exitwise.training import PaddingCollator


def run(policy: ew.ExitPolicy, probs: list[list[list[float]]], num_exits: int = 10):
    """Decisions (exit -> row) for per-exit probability rows, and the final state."""
    state = policy.init_state(len(probs[0]))
    decisions = []
    for k, rows in enumerate(probs):
        done, state = policy.decide(k, num_exits, torch.tensor(rows).log(), state)
        decisions.append(done.tolist())
    return decisions, state


def test_entropy_stage_is_normalized_entropy_below_the_threshold():
    # [0.9, 0.1]: H / log 2 = 0.469
    u = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    probs = [[[0.9, 0.1], [0.5, 0.5]]]
    assert run(ew.get_policy("elbert", threshold=u + 1e-4), probs)[0] == [[True, False]]
    assert run(ew.get_policy("elbert", threshold=u - 1e-4), probs)[0] == [[False, False]]
    assert run(ew.get_policy("elbert", threshold=1.0), probs)[0] == [[True, False]]  # strict


# Three classes, window 3; the entropy stage is off (threshold 0). Per exit, two rows:
# row 0: class 2 holds 0.6, 0.7, 0.65;  row 1: class 0 holds 0.6, then class 1 holds 0.6, 0.8.
WINDOW_PROBS = [
    [[0.2, 0.2, 0.6], [0.6, 0.2, 0.2]],
    [[0.1, 0.2, 0.7], [0.2, 0.6, 0.2]],
    [[0.15, 0.2, 0.65], [0.1, 0.8, 0.1]],
]


def test_window_rule_same_needs_one_class_above_half_at_every_exit_of_the_window():
    decisions, state = run(ew.get_policy("elbert", threshold=0.0, window=3), WINDOW_PROBS)
    # nothing before the window is full; then row 0 (class 2 throughout) leaves, row 1
    # (class 0, then class 1) does not
    assert decisions == [[False, False], [False, False], [True, False]]
    assert state["window_class"].tolist() == [[2, 2, 2], [0, 1, 1]]
    # a margin of 0.15 asks for p > 0.65: row 0's 0.6 and 0.65 are not enough
    margin = ew.get_policy("elbert", threshold=0.0, window=3, margin=0.15)
    assert run(margin, WINDOW_PROBS)[0][-1] == [False, False]
    # window 2: row 1 (class 1 at 0.6 then 0.8) leaves at exit 2 as well
    assert run(ew.get_policy("elbert", threshold=0.0, window=2), WINDOW_PROBS)[0] == [
        [False, False], [True, False], [True, True]]


def test_window_rules_rising_and_stable():
    rising = ew.get_policy("elbert", threshold=0.0, window=3, rule="rising")
    assert run(rising, WINDOW_PROBS)[0][-1] == [False, False]  # 0.7 -> 0.65 falls
    steady = [[[0.2, 0.2, 0.6]], [[0.1, 0.2, 0.7]], [[0.1, 0.2, 0.7]]]  # 0.6, 0.7, 0.7: ties ok
    assert run(rising, steady)[0][-1] == [True]
    stable = ew.get_policy("elbert", threshold=0.0, window=3, rule="stable", spread=0.1)
    assert run(stable, WINDOW_PROBS)[0][-1] == [True, False]  # 0.7 - 0.6 = 0.1 <= 0.1
    tight = ew.get_policy("elbert", threshold=0.0, window=3, rule="stable", spread=0.05)
    assert run(tight, WINDOW_PROBS)[0][-1] == [False, False]


def test_two_classes_read_as_the_reference_class_zero_window():
    """The reference tracks p_0: all of the window below 0.5 - margin (class 1 confident) or
    all above 0.5 + margin. p_0 = 0.3, 0.2, 0.4 is all below 0.5: the row leaves; p_0 = 0.3,
    0.6, 0.2 crosses 0.5: it does not."""
    probs = [[[0.3, 0.7], [0.3, 0.7]], [[0.2, 0.8], [0.6, 0.4]], [[0.4, 0.6], [0.2, 0.8]]]
    assert run(ew.get_policy("elbert", threshold=0.0, window=3), probs)[0][-1] == [True, False]
    # bias_2: p_1 = 0.7, 0.8, 0.6 falls at the end
    rising = ew.get_policy("elbert", threshold=0.0, window=3, rule="rising")
    assert run(rising, probs)[0][-1] == [False, False]


def test_options_are_checked():
    with pytest.raises(ConfigError, match="rule"):
        ew.get_policy("elbert", rule="bias_1")
    with pytest.raises(ConfigError, match="spread"):
        ew.get_policy("elbert", rule="stable")
    with pytest.raises(ConfigError, match="spread"):
        ew.get_policy("elbert", spread=0.1)
    for bad in (0, 2.5, "8"):
        with pytest.raises(ConfigError, match="window"):
            ew.get_policy("elbert", window=bad)
    with pytest.raises(ConfigError, match="margin"):
        ew.get_policy("elbert", margin=0.6)
    with pytest.raises(ConfigError, match="threshold"):
        ew.get_policy("elbert", threshold=1.5)
    policy = ew.get_policy("elbert")  # the reference's shipped configuration, window scaled
    assert policy.params == {"threshold": 0.1, "window": None, "margin": 0.0, "rule": "same",
                             "spread": None}


def test_the_default_window_is_the_references_share_of_the_exits_and_fills():
    """The reference's window of 8 is 8 of ALBERT-base's 12 exits; kept as a count it never
    filled on a model with fewer than 10 exits (the final exit does not decide), so ELBERT
    ran its entropy stage alone there."""
    policy = ew.get_policy("elbert")
    assert [policy.window_for(e) for e in (2, 4, 6, 12, 24)] == [1, 3, 4, 8, 16]
    # six exits, every one 70% sure of class 0, entropy far above the threshold: the window
    # (4 exits) fills at exit 3 and the rows leave there, not at the final exit
    logits = torch.log(torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
    state, left = policy.init_state(2), []
    for k in range(5):
        done, state = policy.decide(k, 6, logits, state)
        left.append(bool(done.all()))
    assert left == [False, False, False, True, True]
    with pytest.raises(ConfigError, match="never fills"):
        ew.get_policy("elbert", window=6).decide(0, 6, logits, ew.get_policy(
            "elbert", window=6).init_state(2))
    assert ew.get_policy("elbert", window=5).window_for(6) == 5


def test_runtime_equals_replay_with_mixed_exits():
    model = tiny_model(num_labels=3).eval()
    batch = PaddingCollator()(token_items(12, seed=4))
    batch.pop("labels")
    cache = collect_exit_logits(model, [batch], progress=False)
    # a random model's exits are near uniform: temperatures 0.05 make them confident enough
    model.temperatures.fill_(0.05)
    policy = ew.get_policy("elbert", threshold=0.5, window=2)
    live = model.early_exit(policy, **batch)
    offline = replay(policy, cache, model.temperatures)
    assert torch.equal(live.exit_index, offline.exit_index)
    assert len(set(live.exit_index.tolist())) > 1, live.exit_index


def test_regression_model_is_refused():
    model = tiny_model(num_labels=1).eval()
    batch = PaddingCollator()([dict(i, labels=0.5) for i in token_items(4)])
    batch.pop("labels")
    with pytest.raises(ConfigError, match="classification"):
        model.early_exit(ew.get_policy("elbert"), **batch)

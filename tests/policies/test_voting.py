"""``voting`` (Sun et al. 2021): the vote count over the exits seen against hand-computed
decisions, the returned prediction (the winning vote, or the final exit's own when no class
gets enough votes), the parameter checks, runtime == replay, and the regression refusal."""

from __future__ import annotations

import pytest
import torch
from helpers.trainkit import tiny_model, token_items

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, collect_exit_logits, replay
from exitwise.errors import ConfigError
from exitwise.training import PaddingCollator


def onehot_logits(classes: list[int], num_classes: int = 2) -> torch.Tensor:
    """(B, C) logits whose arg-max is ``classes`` (margin 1)."""
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


def test_vote_count_over_three_exits_for_two_rows():
    """Row 0 votes 1, 0, 1; row 1 votes 0, 0, 1. With votes=2, row 1 has two votes for class 0
    at exit 1; row 0 reaches two votes for class 1 only at exit 2."""
    policy = ew.get_policy("voting", votes=2)
    state = policy.init_state(2)
    decisions = []
    for k, classes in enumerate([[1, 0], [0, 0], [1, 1]]):
        done, state = policy.decide(k, 4, onehot_logits(classes), state)
        decisions.append(done.tolist())
    assert decisions == [[False, False], [False, True], [True, True]]
    assert state["votes"].tolist() == [[1, 2], [2, 1]]
    # votes=3 needs three votes for one class: nobody has them after these three exits
    three, state = ew.get_policy("voting", votes=3), None
    state = three.init_state(2)
    for k, classes in enumerate([[1, 0], [0, 0], [1, 1]]):
        done, state = three.decide(k, 4, onehot_logits(classes), state)
        assert not bool(done.any())
    # votes=1: the first exit's vote is enough
    assert ew.get_policy("voting", votes=1).decide(
        0, 4, onehot_logits([1, 0]), ew.get_policy("voting", votes=1).init_state(2))[0].all()


def test_a_leaving_row_returns_the_winning_vote_and_the_final_exit_falls_back_to_itself():
    """3 exits, 3 classes, votes=2. Row 0 votes 2, 1, 2: one vote each at exit 1, so it runs to
    the final exit (class 2). Row 1 votes 0, 0, 1: two votes for class 0 at exit 1, where it
    leaves predicting 0, its winning vote. Row 2 votes 1, 2, 0: the final exit returns its own
    class 0. With votes=3 (never early) row 1 returns the final exit's class 1, not its
    plurality 0."""
    votes = [[2, 0, 1], [1, 0, 2], [2, 1, 0]]  # exit -> row -> class
    logits = torch.stack([onehot_logits(v, 3) for v in votes], dim=1)  # (N=3, E=3, C=3)
    cache = ExitLogitsCache(logits, torch.tensor([2, 0, 0]),
                            torch.tensor([[1.0, 2.0, 3.0]]).expand(3, 3),
                            torch.full((3,), 3.0), [1, 2, 3])
    result = replay(ew.get_policy("voting", votes=2), cache)
    assert result.exit_index.tolist() == [2, 1, 2]
    assert result.predictions.tolist() == [2, 0, 0]
    # votes=K never stops a row early: the plain model's final predictions
    full = replay(ew.get_policy("voting", votes=3), cache)
    assert full.exit_index.tolist() == [2, 2, 2]
    assert full.predictions.tolist() == [2, 1, 0]


def test_votes_must_be_a_positive_integer_and_grid_reaches_the_full_model():
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ConfigError):
            ew.get_policy("voting", votes=bad)
    policy = ew.get_policy("voting", votes=2.0)
    assert policy.value == 2 and policy.safer_when == "higher"
    assert policy.grid(4) == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def model_and_batch():
    model = tiny_model(num_labels=3).eval()
    batch = PaddingCollator()(token_items(12, seed=3))
    batch.pop("labels")
    return model, batch


def test_runtime_equals_replay_with_mixed_exits(model_and_batch):
    model, batch = model_and_batch
    cache = collect_exit_logits(model, [batch], progress=False)
    policy = ew.get_policy("voting", votes=2)
    live = model.early_exit(policy, **batch)
    offline = replay(policy, cache)
    assert torch.equal(live.exit_index, offline.exit_index)
    assert torch.equal(live.logits.argmax(-1), offline.predictions)
    assert len(set(live.exit_index.tolist())) > 1, live.exit_index  # the check is not vacuous


def test_regression_model_is_refused():
    model = tiny_model(num_labels=1).eval()
    batch = PaddingCollator()([dict(i, labels=0.5) for i in token_items(4)])
    batch.pop("labels")
    with pytest.raises(ConfigError, match="classification"):
        model.early_exit(ew.get_policy("voting"), **batch)

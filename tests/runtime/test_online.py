"""The online stream runner (UEE-UCB on the real executor) against its offline replay on
cached logits: same arms, predictions, costs and learned state; resuming a stream; the
early-exit is real; the regression refusal and misuse errors."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from helpers.trainkit import tiny_model, token_items

from exitwise.analysis import collect_exit_logits
from exitwise.analysis.stream import replay_stream
from exitwise.errors import ConfigError, InputError
from exitwise.policies.uee_ucb import UCBExitSelector, depth_costs
from exitwise.runtime.online import run_stream, stream_order
from exitwise.training import PaddingCollator

ROWS = 36


def _batches(items: list[dict], size: int) -> list[dict]:
    collate = PaddingCollator()
    return [collate(items[i:i + size]) for i in range(0, len(items), size)]


@functools.cache
def _setup():
    """A tiny 4-exit classifier with temperatures, a shuffled stream of labeled items, and
    the exit-logits cache of those items in that order."""
    model = tiny_model(num_labels=3).eval()
    model.temperatures.copy_(torch.tensor([0.5, 0.8, 1.0, 2.0]))
    items = token_items(ROWS, seed=5)
    order = stream_order(ROWS, seed=11)
    stream = [items[i] for i in order]
    cache = collect_exit_logits(model, _batches(stream, 8), progress=False)
    # every row's top class leads by far more than float round-off between batch shapes
    # (logits of size 0.1, float32), so no observed prediction can flip between the live run
    # and the cache (else they could not agree exactly)
    top2 = cache.logits.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-5
    return model, stream, cache


def _selector() -> UCBExitSelector:
    # costs chosen so that the random model's exits are worth exploring: the choices mix
    return UCBExitSelector(depth_costs([1, 2, 3, 4], scale=0.4), alpha=0.5)


@pytest.mark.parametrize("size", [1, 5])
def test_live_stream_makes_the_same_choices_as_the_offline_replay(size):
    model, stream, cache = _setup()
    live = run_stream(model, _batches(stream, size), _selector())
    offline = replay_stream(cache, _selector(), batch_size=size,
                            temperatures=model.temperatures)
    assert live.arms == offline.arms
    assert len(set(live.arms)) > 1, live.arms  # not a constant choice: the test can fail
    assert live.sizes == offline.sizes == [len(b["input_ids"]) for b in _batches(stream, size)]
    assert live.rewards == offline.rewards
    assert torch.equal(live.predictions, offline.predictions)
    assert torch.equal(live.exit_index, offline.exit_index)
    assert torch.equal(live.exit_layer, offline.exit_layer)
    assert torch.equal(live.labels, offline.labels) and bool((live.labels >= 0).all())
    assert torch.equal(live.flops, offline.flops)  # one cost table for both
    assert live.selector_state == offline.selector_state
    assert live.accuracy == offline.accuracy and not math.isnan(live.accuracy)
    json.dumps(live.metrics())  # JSON-able


def test_the_stream_really_exits_early_and_learns_from_the_exits_it_ran():
    model, stream, cache = _setup()
    live = run_stream(model, _batches(stream, 1), _selector())
    state = live.selector_state
    assert live.arms[0] == 3  # first sample: the last exit (observes every exit)
    # each exit was observed exactly once per sample played at it or deeper
    arms = torch.tensor(live.arms)
    assert state["observed"] == [int((arms >= k).sum()) for k in range(4)]
    # a row that left at exit k cost what the cache says leaving at k costs (less than full)
    rows = torch.arange(ROWS)
    assert torch.equal(live.flops, cache.costs[rows, live.exit_index])
    early = live.exit_index < 3
    assert bool(early.any()) and bool((live.flops[early] < cache.costs[early, 3]).all())
    # the disagreements it counted are those of the exits' predictions in the cache
    preds = cache.logits.argmax(-1)
    expected = [int(((preds[:, k] != preds[:, 0]) & (arms >= k)).sum()) for k in range(4)]
    assert state["disagreed"] == expected


def test_an_interrupted_stream_resumes_with_the_same_choices():
    model, stream, cache = _setup()
    whole = run_stream(model, _batches(stream, 2), _selector())
    head = run_stream(model, _batches(stream[:14], 2), _selector())
    saved = json.loads(json.dumps(head.selector_state))
    tail = run_stream(model, _batches(stream[14:], 2), UCBExitSelector.from_state_dict(saved))
    assert head.arms + tail.arms == whole.arms
    assert tail.selector_state == whole.selector_state
    # offline: the same split of the cache's rows
    first = _selector()
    a = replay_stream(cache, first, batch_size=2, order=range(14))
    b = replay_stream(cache, UCBExitSelector.from_state_dict(first.state_dict()),
                      batch_size=2, order=range(14, ROWS))
    assert a.arms + b.arms == whole.arms


def test_replay_follows_a_given_order_and_batch_sizes():
    _, _, cache = _setup()
    order = stream_order(ROWS, seed=2)
    assert sorted(order) == list(range(ROWS)) and order == stream_order(ROWS, seed=2)
    assert order != stream_order(ROWS, seed=3)
    res = replay_stream(cache, _selector(), batch_size=[1, 5, 30], order=order)
    assert res.sizes == [1, 5, 30]
    assert torch.equal(res.labels, cache.labels[torch.tensor(order)])


def test_labels_are_optional_and_only_reported():
    model, stream, _ = _setup()
    batches = _batches(stream, 4)
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with_labels = run_stream(model, batches, _selector())
    without = run_stream(model, unlabeled, _selector())
    assert with_labels.arms == without.arms  # the choices never look at labels
    assert math.isnan(without.accuracy) and bool((without.labels == -1).all())


def test_training_mode_is_restored():
    model, stream, _ = _setup()
    model.train()
    try:
        run_stream(model, _batches(stream[:2], 1), _selector())
        assert model.training
    finally:
        model.eval()


def test_regression_models_and_misfit_selectors_are_refused():
    reg = tiny_model(num_labels=1).eval()
    batch = PaddingCollator()([dict(i, labels=0.5) for i in token_items(2)])
    with pytest.raises(ConfigError, match="regression model outputs a value, not a class"):
        run_stream(reg, [batch], _selector())
    reg_cache = collect_exit_logits(reg, [batch], progress=False)
    with pytest.raises(ConfigError, match="regression"):
        replay_stream(reg_cache, _selector())
    model, stream, cache = _setup()
    with pytest.raises(ConfigError, match="3 arms but the model has 4 exits"):
        run_stream(model, _batches(stream[:1], 1), UCBExitSelector([0.1, 0.2, 0.3]))
    with pytest.raises(ConfigError, match="3 arms"):
        replay_stream(cache, UCBExitSelector([0.1, 0.2, 0.3]))
    with pytest.raises(InputError, match="add up"):
        replay_stream(cache, _selector(), batch_size=[3, 3])
    with pytest.raises(InputError, match="batch_size"):
        replay_stream(cache, _selector(), batch_size=0)
    with pytest.raises(InputError, match="outside"):
        replay_stream(cache, _selector(), order=[0, ROWS])
    with pytest.raises(InputError, match="cannot read a batch"):
        run_stream(model, ["text"], _selector())

"""``badge`` (BADGE's divergence-based exit): the divergences between adjacent exits and the
run of small ones against hand-computed values, option checks, runtime == replay, and the
regression refusal."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.errors import ConfigError
from exitwise.policies.badge import divergence
from exitwise.training import PaddingCollator


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def js(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return (kl(p, m) + kl(q, m)) / 2


def test_divergences_by_hand():
    p, q = [0.7, 0.2, 0.1], [0.5, 0.25, 0.25]
    lp, lq = torch.tensor([p]).log(), torch.tensor([q]).log()
    assert float(divergence(lp, lq, "js")) == pytest.approx(js(p, q), rel=1e-5)
    assert float(divergence(lp, lq, "kl")) == pytest.approx(kl(p, q), rel=1e-5)  # KL(prev||cur)
    assert float(divergence(lp, lq, "reverse_kl")) == pytest.approx(kl(q, p), rel=1e-5)
    # a zero probability: JS stays finite (at most log 2), 0 log 0 = 0
    one, other = torch.tensor([[1.0, 0.0]]).log(), torch.tensor([[0.0, 1.0]]).log()
    assert float(divergence(one, other, "js")) == pytest.approx(math.log(2), rel=1e-6)


def test_run_of_small_divergences_between_adjacent_exits():
    """Row 0: exits 0.6/0.4 -> 0.62/0.38 -> 0.63/0.37 (tiny JS each time). Row 1: 0.6/0.4 ->
    0.1/0.9 (large JS) -> 0.12/0.88 (tiny). With threshold 0.01: patience 1 exits row 0 at
    exit 1 and row 1 at exit 2; patience 2 exits row 0 at exit 2 and row 1 not yet (its run
    was reset at exit 1). Nobody leaves at exit 0."""
    seq = [[[0.6, 0.4], [0.6, 0.4]], [[0.62, 0.38], [0.1, 0.9]], [[0.63, 0.37], [0.12, 0.88]]]
    assert js([0.6, 0.4], [0.62, 0.38]) < 0.01 < js([0.6, 0.4], [0.1, 0.9])
    assert js([0.1, 0.9], [0.12, 0.88]) < 0.01

    def decisions(policy):
        state, out = policy.init_state(2), []
        for k, rows in enumerate(seq):
            done, state = policy.decide(k, 5, torch.tensor(rows).log(), state)
            out.append(done.tolist())
        return out, state

    one, _ = decisions(ew.get_policy("badge", threshold=0.01))
    assert one == [[False, False], [True, False], [True, True]]
    two, state = decisions(ew.get_policy("badge", threshold=0.01, patience=2))
    assert two == [[False, False], [False, False], [True, False]]
    assert state["run"].tolist() == [2, 1]
    # threshold 0 never exits (strict <)
    never, _ = decisions(ew.get_policy("badge", threshold=0.0))
    assert not any(any(row) for row in never)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="divergence"):
        ew.get_policy("badge", divergence="cosine")
    for bad in (0, 1.5, "2"):
        with pytest.raises(ConfigError, match="patience"):
            ew.get_policy("badge", patience=bad)
    with pytest.raises(ConfigError, match="threshold"):
        ew.get_policy("badge", threshold=-0.1)
    policy = ew.get_policy("badge")
    assert policy.params == {"threshold": 0.01, "patience": 1, "divergence": "js"}
    assert policy.safer_when == "lower" and policy.grid(4)[0] == 0.0


def test_runtime_equals_replay_with_mixed_exits():
    model = tiny_model(num_labels=3).eval()
    batch = PaddingCollator()(token_items(12, seed=5))
    batch.pop("labels")
    cache = collect_exit_logits(model, [batch], progress=False)
    model.temperatures.fill_(0.05)  # spread a random model's near-uniform exits apart
    divs = []
    for k in range(1, cache.num_exits):
        scaled = torch.log_softmax(cache.logits[:, k - 1:k + 1] / 0.05, -1)
        divs.append(divergence(scaled[:, 0], scaled[:, 1]))
    # midway between two middle divergences: some pairs below, some above, none on the edge
    ordered = torch.cat(divs).sort().values
    mid = len(ordered) // 2
    threshold = float(ordered[mid - 1] + ordered[mid]) / 2
    policy = ew.get_policy("badge", threshold=threshold)
    live = model.early_exit(policy, **batch)
    offline = replay(policy, cache, model.temperatures)
    assert torch.equal(live.exit_index, offline.exit_index)
    assert len(set(live.exit_index.tolist())) > 1, live.exit_index


def test_regression_model_is_refused():
    model = tiny_model(num_labels=1).eval()
    batch = PaddingCollator()([dict(i, labels=0.5) for i in token_items(4)])
    batch.pop("labels")
    with pytest.raises(ConfigError, match="classification"):
        model.early_exit(ew.get_policy("badge"), **batch)

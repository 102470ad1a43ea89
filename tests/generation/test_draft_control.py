"""The automatic draft length (``exitwise.generation.draft_control``): its cost model, its
acceptance estimate and its choices against values computed by hand, and that decoding with it
stays exactly greedy."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import EOS, PAD, left_padded, tiny_lm

from exitwise.errors import ConfigError
from exitwise.generation import DraftLengthController, generate


def test_acceptance_estimate_and_expected_tokens_by_hand():
    c = DraftLengthController(max_len=4, discount=1.0)
    assert c.alpha("exit") == 0.5  # Beta(1, 1) prior
    c.record_acceptance("exit", kept=6, rejections=2)
    assert c.alpha("exit") == pytest.approx(7 / 10)
    c.record_acceptance("exit", kept=0, rejections=2)
    assert c.alpha("exit") == pytest.approx(7 / 12)
    assert c.expected_tokens(0, 0.7) == 1.0
    assert c.expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    d = DraftLengthController(max_len=4, discount=0.5)
    d.record_acceptance("ngram", kept=4, rejections=0)
    d.record_acceptance("ngram", kept=0, rejections=2)  # the 4 kept now count as 2
    assert d.alpha("ngram") == pytest.approx((2 + 1) / (2 + 2 + 2))


def test_cost_model_interpolates_and_extrapolates():
    c = DraftLengthController(max_len=6, smoothing=1.0)
    c.record_costs(rows=1, q=1, verify_s=0.10, draft_s=0.02, draft_passes=1)
    c.record_costs(rows=1, q=5, verify_s=0.30, draft_s=0.10, draft_passes=5)
    # verify(3) halfway between q=1 and q=5; verify(7) along the same slope (0.05 per token)
    assert c.costs[1].verify_cost(3) == pytest.approx(0.20)
    assert c.costs[1].verify_cost(7) == pytest.approx(0.40)
    # T(k) = (k + 1) * t_draft + verify(k + 1) with t_draft = 0.02 per pass
    assert c.step_cost(1, 2, "per_token") == pytest.approx(3 * 0.02 + 0.20)
    assert c.step_cost(1, 2, "one") == pytest.approx(0.02 + 0.20)
    assert c.step_cost(1, 2, "none") == pytest.approx(0.20)
    assert c.step_cost(4, 2) is None  # nothing timed at 4 rows yet


def _timed(verify: dict[int, float], draft: float, alpha_counts=(8, 2), max_len=4):
    c = DraftLengthController(max_len=max_len, explore_every=0, smoothing=1.0, discount=1.0)
    for q, t in verify.items():
        c.record_costs(1, q, t, draft, 1)
    c.record_acceptance("exit", *alpha_counts)
    return c


def test_choice_maximises_tokens_per_second():
    # flat verification (the CPU batch-1 case), alpha = 9/12 = 0.75, cheap drafts:
    # rate(k) = (1 - 0.75^(k+1)) / 0.25 / ((k + 1) * 0.01 + 0.1); by hand k = 4 is best
    flat = _timed({1: 0.1, 5: 0.1}, 0.01, (8, 2))
    rates = [sum(0.75 ** i for i in range(k + 1)) / ((k + 1) * 0.01 + 0.1) for k in range(5)]
    assert flat.choose(1) == max(range(5), key=rates.__getitem__) == 4
    # verification that grows with every position (the batch-4 case): plain decoding wins
    steep = _timed({1: 0.1, 5: 0.5}, 0.01, (8, 2))
    assert steep.choose(1) == 0
    # drafts that are rarely kept: plain decoding, however cheap verifying is
    poor = _timed({1: 0.1, 5: 0.1}, 0.02, (0, 20))
    assert poor.choose(1) == 0


def test_explores_both_ends_first_then_neighbours():
    c = DraftLengthController(max_len=3, explore_every=4, smoothing=1.0, discount=1.0)
    c.begin_step()
    assert c.choose(2) == 1  # nothing timed: a one-token draft
    c.record_costs(2, 2, 0.1, 0.02, 2)
    c.begin_step()
    assert c.choose(2) == 0  # then plain decoding
    c.record_costs(2, 1, 0.1, 0.01, 1)
    c.record_acceptance("exit", 0, 50)  # drafts never kept: k = 0 is best ...
    picks = []
    for _ in range(6):
        c.begin_step()
        picks.append(c.choose(2))
    assert picks == [0, 1, 0, 0, 0, 1]  # ... but steps 4 and 8 try the neighbour k = 1
    assert c.history["exit"] == [1, 0] + picks


def test_bad_options_are_refused():
    with pytest.raises(ConfigError):
        DraftLengthController(max_len=0)
    with pytest.raises(ConfigError, match="draft_len"):
        generate(tiny_lm("llama"), torch.tensor([[3, 4]]), strategy="self_speculative",
                 exit_layer=1, draft_len="fast")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_auto_draft_length_is_lossless_and_varies(family):
    model = tiny_lm(family)
    ids, mask = left_padded()
    ref = generate(model, ids, mask, max_new_tokens=24, eos_token_id=EOS, pad_token_id=PAD,
                   kernels="stock")
    seen = []
    for rows in (slice(0, 1), slice(0, 3)):
        out = generate(model, ids[rows], mask[rows], max_new_tokens=24, eos_token_id=EOS,
                       pad_token_id=PAD, strategy="self_speculative", exit_layer=1,
                       draft_len="auto", max_draft_len=5)
        assert torch.equal(out.sequences, ref.sequences[rows])
        seen.append(out.stats.step_draft_lengths)
        assert max(seen[-1]) <= 5
    # a fresh model's first call times a one-token draft, then plain decoding; both batch
    # sizes then run what their own timings say (the second call starts with its own timing)
    assert seen[0][:2] == [1, 0]
    assert all(0 in lengths for lengths in seen)

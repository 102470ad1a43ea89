"""The automatic draft length (``exitwise.generation.draft_control``): its cost model, its
acceptance estimate and its choices against values computed by hand, and that decoding with it
stays exactly greedy."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import EOS, PAD, left_padded, tiny_lm

from exitwise.errors import ConfigError
from exitwise.generation import DraftLengthController, generate


def test_acceptance_per_position_and_expected_tokens_by_hand():
    c = DraftLengthController(max_len=4, discount=1.0)
    assert c.alphas("exit", 3) == [0.5, 0.5, 0.5]  # Beta(1, 1) prior
    # rows: 3 drafts all kept; 3 drafts, first rejected; 2 drafts, 1 kept; 1 draft kept
    c.record_acceptance("exit", accepted=[3, 0, 1, 1], drafted=[3, 3, 2, 1])
    # position 1 reached by 4 rows, kept by 3; position 2 reached by 2 (rows 0, 2), kept by 1;
    # position 3 reached by 1 (row 0), kept by 1
    assert c.reached["exit"] == [4.0, 2.0, 1.0] and c.kept["exit"] == [3.0, 1.0, 1.0]
    assert c.alphas("exit", 4) == pytest.approx([4 / 6, 2 / 4, 2 / 3, 2 / 3])
    a = [0.8, 0.5, 0.25]
    assert c.expected_tokens(0, a) == 1.0
    assert c.expected_tokens(3, a) == pytest.approx(1 + 0.8 + 0.4 + 0.1)
    d = DraftLengthController(max_len=4, discount=0.5)
    d.record_acceptance("ngram", accepted=[1, 1], drafted=[1, 1])
    d.record_acceptance("ngram", accepted=[0], drafted=[1])  # the 2 earlier rows count as 1
    assert d.alphas("ngram", 1) == pytest.approx([(1 + 1) / (2 + 2)])


def test_cost_model_interpolates_and_extrapolates():
    c = DraftLengthController(max_len=6, window=1)
    c.record_costs(rows=1, q=1, verify_s=0.10, draft_s=0.02, draft_passes=1)
    c.record_costs(rows=1, q=5, verify_s=0.30, draft_s=0.10, draft_passes=5)
    # verify(3) halfway between q=1 and q=5; verify(7) along the same slope (0.05 per token)
    assert c.costs[1].verify_cost(3) == pytest.approx(0.20)
    assert c.costs[1].verify_cost(7) == pytest.approx(0.40)
    # T(k) = (k + 1) * t_draft + verify(k + 1) with t_draft = 0.02 per pass
    assert c.step_cost(1, 2, "per_token") == pytest.approx(3 * 0.02 + 0.20)
    # drafts known up front: one pass of k + 1 = 3 positions below the exit, not yet timed,
    # so the one-position pass (0.02 s) scaled as verification scales from 1 to 3 (x 2)
    assert c.step_cost(1, 2, "one") == pytest.approx(0.02 * 2 + 0.20)
    assert c.step_cost(1, 2, "none") == pytest.approx(0.20)
    assert c.step_cost(4, 2) is None  # nothing timed at 4 rows yet


def _timed(verify: dict[int, float], draft: float, outcomes=(), max_len=4):
    """A controller with these verification costs (1 row) and acceptance outcomes
    [(accepted, drafted), ...] of single rows."""
    c = DraftLengthController(max_len=max_len, explore_every=0, window=1, discount=1.0)
    for q, t in verify.items():
        c.record_costs(1, q, t, draft, 1)
    for n, k in outcomes:
        c.record_acceptance("exit", [n], [k])
    return c


def test_choice_maximises_tokens_per_second():
    # every position kept 3 times in 4 (alpha_j = (3x + 1) / (4x + 2) = 0.75 with x = 2.5):
    # 10 rows drafting 1 token, 7 or 8 of them kept... built directly instead:
    flat = _timed({1: 0.1, 5: 0.1}, 0.01)
    flat.reached["exit"], flat.kept["exit"] = [10.0] * 4, [7.0] * 4  # alpha_j = 8/12
    a = 8 / 12
    rates = [sum(a ** i for i in range(k + 1)) / ((k + 1) * 0.01 + 0.1) for k in range(5)]
    # flat verification (the CPU batch-1 case) and cheap drafts: the longest draft
    assert flat.choose(1) == max(range(5), key=rates.__getitem__) == 4
    # a first draft kept often, later ones rarely (a conditioned exit): one draft
    first = _timed({1: 0.1, 5: 0.1}, 0.01)
    first.reached["exit"], first.kept["exit"] = [10.0, 10.0], [8.0, 1.0]
    al = first.alphas("exit", 4)  # [9/12, 2/12, 2/12, 2/12]
    rates = [first.expected_tokens(k, al) / ((k + 1) * 0.01 + 0.1) for k in range(5)]
    assert first.choose(1) == max(range(5), key=rates.__getitem__) == 1
    # verification that grows with every position (the batch-4 case): plain decoding wins
    steep = _timed({1: 0.1, 5: 0.5}, 0.01, [(1, 1)] * 8 + [(0, 1)] * 2)
    assert steep.choose(1) == 0
    # drafts that are rarely kept: plain decoding, however cheap verifying is
    poor = _timed({1: 0.1, 5: 0.1}, 0.02, [(0, 1)] * 20)
    assert poor.choose(1) == 0


def test_a_cold_first_timing_is_retimed_until_outvoted():
    # the first one-token draft is timed cold (verifying 2 positions: 1.0 s, as when a shape's
    # kernels are chosen during the step); warm, it takes 0.15 s; drafts are never kept
    c = DraftLengthController(max_len=3, explore_every=4, window=16, discount=1.0)
    c.begin_step()
    assert c.choose(2) == 1
    c.record_costs(2, 2, 1.0, 0.02, 2)
    c.begin_step()
    assert c.choose(2) == 0
    c.record_costs(2, 1, 0.1, 0.01, 1)
    c.record_acceptance("exit", [0] * 50, [1] * 50)
    picks = []
    for _ in range(36):
        c.begin_step()
        k = c.choose(2)
        picks.append(k)
        if k:  # the step that tries it times it again, warm now
            c.record_costs(2, 2, 0.15, 0.02, 2)
    # k = 1 is clearly worse, but timed fewer than 3 times it is tried at each exploring step
    # (4, 8) until the median (0.15 s of 1.0, 0.15, 0.15) outvotes the cold timing; then
    # only every 8 x explore_every = 32 steps
    assert [i + 3 for i, k in enumerate(picks) if k] == [4, 8, 32]
    assert c.costs[2].timed(2) == 4 and c.costs[2].verify[2] == pytest.approx(0.15)


def test_a_few_rejected_first_drafts_do_not_switch_drafting_off():
    """The demo's cold start: the first one-token draft is timed cold (0.2 s to verify 2
    positions; 0.05 s warm) and rejected, plain steps take 0.042 s. Before, plain decoding won
    on that one draft and rested (the next try 16 steps later, then every 128 once the
    timings were warm: a whole answer without a draft)."""
    c = DraftLengthController(max_len=3, explore_every=16, window=16, discount=0.98)
    c.begin_step()
    assert c.choose(1) == 1
    c.record_costs(1, 2, 0.2, 0.009, 2)
    c.record_acceptance("exit", [0], [1])
    c.begin_step()
    assert c.choose(1) == 0
    c.record_costs(1, 1, 0.042, 0.0033, 1)
    picks = []
    for _ in range(12):
        c.begin_step()
        picks.append(c.choose(1))
        if picks[-1]:
            c.record_costs(1, 2, 0.05, 0.0046, 2)
            c.record_acceptance("exit", [0], [1])  # rejected every time
    # rows judged after m more drafting steps: sum of 0.98^i for i = 0..m, first >= 8 at
    # m = 8 (8.34); then the model decides: alpha = 1 / 10.34, plain decoding clearly wins
    assert picks == [1] * 8 + [0] * 4
    assert c.judged("exit") == pytest.approx(sum(0.98**i for i in range(9)))
    assert c.resting(1, ["exit"])


def test_explores_both_ends_first_then_neighbours():
    c = DraftLengthController(max_len=3, explore_every=4, window=1, discount=1.0)
    c.begin_step()
    assert c.choose(2) == 1  # nothing timed: a one-token draft
    c.record_costs(2, 2, 0.15, 0.02, 2)
    c.begin_step()
    assert c.choose(2) == 0  # then plain decoding
    c.record_costs(2, 1, 0.1, 0.01, 1)
    c.record_acceptance("exit", [0] * 50, [1] * 50)  # drafts never kept: k = 0 is best ...
    picks = []
    for _ in range(36):
        c.begin_step()
        picks.append(c.choose(2))
    # ... and k = 1 is clearly worse (drafts kept 1 time in 52, for 55% more time), so it
    # is tried only every 8 x explore_every = 32 steps, not every 4
    assert [i + 3 for i, k in enumerate(picks) if k] == [32]
    # a neighbour close to the best is tried every 4 steps
    e = DraftLengthController(max_len=1, explore_every=4, window=1, discount=1.0)
    e.record_costs(2, 1, 0.1, 0.01, 1)
    e.record_costs(2, 2, 0.1, 0.01, 1)  # T(0) = 0.11 s, T(1) = 0.12 s
    e.record_acceptance("exit", [0] * 10, [1] * 10)  # alpha_1 = 1/12: 1.083 tokens for T(1)
    picks = []
    for _ in range(8):
        e.begin_step()
        picks.append(e.choose(2))
    assert picks == [0, 0, 0, 1, 0, 0, 0, 1]


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


def test_costs_are_medians_of_the_latest_timings():
    c = DraftLengthController(max_len=2, window=3)
    for t in (0.10, 0.90, 0.12):  # a spike among steady timings does not move the estimate
        c.record_costs(1, 1, t, 0.02, 1)
    assert c.costs[1].verify[1] == pytest.approx(0.12)
    for t in (0.30, 0.31):  # the window follows a lasting change: median of (0.12, 0.3, 0.31)
        c.record_costs(1, 1, t, 0.04, 1)
    assert c.costs[1].verify[1] == pytest.approx(0.30)
    # these plain steps' passes below the exit (no head) time the unit, not a draft pass
    assert c.costs[1].unit() == pytest.approx(0.04)  # median of (0.02, 0.04, 0.04)
    assert c.costs[1].draft is None
    with pytest.raises(ConfigError, match="window"):
        DraftLengthController(window=0)


def test_the_clock_overrules_the_model():
    # the model favours one-token drafts (cheap drafts, flat verification, alpha = 0.9) ...
    c = _timed({1: 0.1, 2: 0.1}, 0.001, [(1, 1)] * 20, max_len=1)
    c.begin_step()
    assert c.choose(1) == 1
    # ... but drafting steps realized 1.5 tokens in 0.2 s (7.5/s) and plain ones 1 token in
    # 0.1 s (10/s): plain decoding, and then resting
    for _ in range(4):
        c.record_step(1, True, 3, 0.4)  # 2 rows: 3 tokens in all
        c.record_step(1, False, 1, 0.1)
    d = 0.95  # every step discounts both kinds alike: each kind's rate stays the same ...
    assert c.realized_rate(1, True) == pytest.approx(7.5)
    assert c.realized_rate(1, False) == pytest.approx(10.0)
    # ... while its weight is the discounted count of its steps (drafting: steps 1, 3, 5, 7)
    assert c.realized[(1, True)][2] == pytest.approx(d**7 + d**5 + d**3 + d)  # 3.28
    c.begin_step()
    assert c.choose(1) == 0 and c.resting(1, ["exit"])
    # the drafting evidence expires as plain steps go on (3.28 x 0.95^2 < 3): the model
    # decides again
    for _ in range(2):
        c.record_step(1, False, 1, 0.1)
    assert c.realized_rate(1, True) is None
    for _ in range(15):  # the next step that chooses (explore_every is 0: every step)
        c.begin_step()
    assert c.choose(1) == 1 and not c.resting(1, ["exit"])
    # fewer than 3 steps of a kind: not trusted yet
    fresh = _timed({1: 0.1, 2: 0.1}, 0.001, [(1, 1)] * 20, max_len=1)
    fresh.record_step(1, True, 1, 1.0)
    fresh.record_step(1, False, 1, 0.1)
    assert fresh.realized_rate(1, True) is None and fresh.choose(1) == 1
    # within the 5% margin the clock leaves the choice to the model
    close = _timed({1: 0.1, 2: 0.1}, 0.001, [(1, 1)] * 20, max_len=1)
    for _ in range(4):
        close.record_step(1, True, 97, 10.0)  # 9.7/s against 10/s
        close.record_step(1, False, 1, 0.1)
    assert not close.clock_prefers_plain(1) and close.choose(1) == 1


def test_only_a_clear_win_of_plain_decoding_rests():
    # verify(1) = 0.1, verify(2) = 0.1, drafts 0.02 s: k = 1 costs 0.14 s for 1 + a tokens,
    # k = 0 costs 0.12 s for 1 token (8.33/s); plain wins when a < 0.14 / 0.12 - 1 = 0.167,
    # clearly (by 10%) when (1 + a) / 0.14 <= 8.33 / 1.1, i.e. a <= 0.061
    def after(kept: int, reached: int) -> DraftLengthController:
        c = _timed({1: 0.1, 2: 0.1}, 0.02, max_len=1)
        c.reached["exit"], c.kept["exit"] = [float(reached)], [float(kept)]
        c.begin_step()
        return c

    clear = after(0, 98)  # alpha = 1 / 100: k = 1 at 1.01 / 0.14 = 7.21/s
    assert clear.choose(1) == 0 and clear.resting(1, ["exit"])
    near = after(10, 98)  # alpha = 11 / 100: 1.11 / 0.14 = 7.93/s, within 10% of 8.33/s
    assert near.choose(1) == 0 and not near.resting(1, ["exit"])


def test_verification_is_kept_in_draft_passes_of_the_same_step():
    # q = 1 timed in a fast phase (0.10 s, its draft pass 0.01 s), q = 2 in a phase twice
    # as slow (0.24 s, pass 0.02 s): 10 and 12 passes, so verify(2) / verify(1) is 1.2
    # (in seconds it would look 2.4), both at the current pass (the latest: window 1)
    c = DraftLengthController(max_len=2, window=1)
    c.record_costs(1, 1, 0.10, 0.01, 1)
    c.record_costs(1, 2, 0.24, 0.04, 2)  # two passes in 0.04 s: 0.02 each
    assert c.costs[1].ratio == pytest.approx({1: 10.0, 2: 12.0})
    assert c.costs[1].verify == pytest.approx({1: 0.20, 2: 0.24})
    # a faster pass again rescales both: the choice depends on the multiples alone
    c.record_costs(1, 1, 0.05, 0.005, 1)
    assert c.costs[1].verify == pytest.approx({1: 0.05, 2: 0.06})
    # a drafting step's passes include the exit head; the unit is its first pass's blocks
    # alone (0.02 s), as in plain steps: 12 passes, not 0.24 / 0.03 = 8
    h = DraftLengthController(max_len=2, window=1)
    h.record_costs(1, 2, 0.24, 0.06, 2, unit_s=0.02)
    assert h.costs[1].ratio == pytest.approx({2: 12.0}) and h.costs[1].draft == 0.03
    assert h.step_cost(1, 1) == pytest.approx(2 * 0.03 + 0.24)
    # without draft passes (drafts known up front, no exit), seconds as timed
    s = DraftLengthController(max_len=2, window=1)
    s.record_costs(1, 3, 0.3, None, 0)
    assert s.costs[1].verify == {3: 0.3} and not s.costs[1].ratio


def test_a_pass_of_several_positions_is_not_the_unit():
    # a plain step: the one-position pass (0.01 s) is the unit, verifying 1 is 10 of them
    c = DraftLengthController(max_len=4, window=1)
    c.record_costs(1, 1, 0.10, 0.01, 1)
    # drafts known up front: one pass of 3 positions (0.015 s) then verifying 3 (0.12 s);
    # in the current unit that pass is 1.5 and verifying 12 (taking the 3-position pass as
    # the unit would make it 0.12 / 0.015 = 8)
    c.record_costs(1, 3, 0.12, 0.015, 1, positions=3)
    assert c.costs[1].unit() == 0.01 and c.costs[1].passes == pytest.approx({3: 1.5})
    assert c.costs[1].ratio == pytest.approx({1: 10.0, 3: 12.0})
    assert c.costs[1].draft is None  # not a per-position draft pass either
    assert c.step_cost(1, 2, "one") == pytest.approx(0.015 + 0.12)
    # k = 1: a pass of 2 halfway between 1 (the unit) and 1.5 units; verify(2) = 11 units
    assert c.step_cost(1, 1, "one") == pytest.approx(0.0125 + 0.11)
    # k = 3: along the line through them, 1.75 units; verify(4) = 13 units
    assert c.step_cost(1, 3, "one") == pytest.approx(0.0175 + 0.13)
    assert c.step_cost(1, 0, "one") == pytest.approx(0.01 + 0.10)  # a plain step
    # a slower phase later rescales the pass too: it is kept in units
    c.record_costs(1, 1, 0.20, 0.02, 1)
    assert c.step_cost(1, 2, "one") == pytest.approx(0.03 + 0.24)


def test_plain_decoding_is_retimed_while_drafting_wins():
    # longer drafts win (k = 4 here, see the first test) and plain decoding is still tried
    # from the steps that are explore_every past a multiple of 8 x explore_every (2, 18), for
    # PLAIN_BURST steps in a row: its cost is the baseline
    from exitwise.generation.draft_control import PLAIN_BURST

    # the fewest steps whose discounted count (1 + 0.95 + 0.95^2 + ...) reaches 3: 3.71 at 4
    assert PLAIN_BURST == 4
    c = DraftLengthController(max_len=4, explore_every=2, window=1, discount=1.0)
    c.record_costs(1, 1, 0.1, 0.01, 1)
    c.record_costs(1, 5, 0.1, 0.01, 1)
    c.reached["exit"], c.kept["exit"] = [10.0] * 4, [9.0] * 4
    picks = []
    for _ in range(20):
        c.begin_step()
        picks.append(c.choose(1))
    assert [i + 1 for i, k in enumerate(picks) if k == 0] == [2, 3, 4, 5, 18, 19, 20]


def test_a_plain_re_timing_lets_the_clock_decide():
    # the model favours one-token drafts; drafting steps realize 7.5 tokens/s. One plain step
    # every 8 x explore_every never counted (its weight expired); a re-timing's PLAIN_BURST
    # plain steps at 10 tokens/s do, and the clock then chooses plain decoding
    c = _timed({1: 0.1, 2: 0.1}, 0.001, [(1, 1)] * 20, max_len=1)
    c.explore_every = 3  # the re-timing begins at step 3 (3 past a multiple of 24)
    for _ in range(20):
        c.record_step(1, True, 3, 0.4)
    picks = []
    for _ in range(7):
        c.begin_step()
        k = c.choose(1)
        picks.append(k)
        c.record_step(1, bool(k), 3 if k else 1, 0.4 if k else 0.1)
        if c.steps == 6:  # the re-timing's last step: its rate now counts
            assert c.realized_rate(1, False) == pytest.approx(10.0)
    assert picks == [1, 1, 0, 0, 0, 0, 0]  # steps 3-6: re-timing; 7: the clock's choice
    c.begin_step()
    assert c.resting(1, ["exit"])  # plain decoding won clearly: step 8 rests
    # without the re-timing (a controller that never explores) the clock never decides
    never = _timed({1: 0.1, 2: 0.1}, 0.001, [(1, 1)] * 20, max_len=1)
    for _ in range(20):
        never.record_step(1, True, 3, 0.4)
    assert all(never.choose(1) == 1 for _ in range(7))


def test_a_shared_head_keeps_its_controller_across_calls():
    from exitwise.generation import speculative

    model = tiny_lm("llama")
    for _ in range(2):
        generate(model, torch.tensor([[3, 4, 5]]), max_new_tokens=6, eos_token_id=[],
                 strategy="self_speculative", exit_layer=1, draft_len="auto")
    keys = list(speculative._CONTROLLERS[model])
    assert len(keys) == 1 and keys[0][:2] == ("self_speculative", "shared")


def test_a_plain_step_is_costed_without_the_exit_head():
    # a plain step: its pass below the exit (0.01 s, no head) is the unit; verifying one
    # position took 0.10 s = 10 units
    c = DraftLengthController(max_len=2, window=1)
    c.record_costs(1, 1, 0.10, 0.01, 1)
    assert c.costs[1].draft is None and c.step_cost(1, 1) is None  # no draft pass timed
    # a drafting step: 2 passes with the head took 0.06 s (0.03 each), the unit 0.02 s,
    # verifying 2 positions 0.24 s = 12 units; verifying 1 is now 10 x 0.02 = 0.2 s
    c.record_costs(1, 2, 0.24, 0.06, 2, unit_s=0.02)
    assert c.costs[1].draft == pytest.approx(0.03)
    # k = 0 runs the unit and verifies 1 (0.02 + 0.2), not a draft pass with the head
    # (0.03 + 0.2, which made plain decoding look dearer than it is by the head's share)
    assert c.step_cost(1, 0) == pytest.approx(0.22)
    assert c.step_cost(1, 1) == pytest.approx(2 * 0.03 + 0.24)



def test_step_costs_are_computed_once_per_set_of_timings():
    c = _timed({1: 0.1, 2: 0.1}, 0.01, max_len=2)
    first = c._step_costs(1, "per_token", "exit")
    assert first == [c.step_cost(1, k) for k in range(3)]
    # the sources of one step (the exit, each n-gram level) share one computation ...
    assert c._step_costs(1, "per_token", "ngram/3") is first
    # ... until a new timing: verifying 2 positions now took 0.3 s (30 units of 0.01 s)
    c.record_costs(1, 2, 0.3, 0.01, 1)
    again = c._step_costs(1, "per_token", "exit")
    assert again[1] == pytest.approx(2 * 0.01 + 0.3) and first[1] == pytest.approx(0.12)

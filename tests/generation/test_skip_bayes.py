"""Draft & Verify's Bayesian search on timed decoding (``exitwise.generation.skip_bayes``): the
0.5 threshold from a point to a set, the default probes, the acquisition's choice, the timed
objective on a fake clock, the schedule (probes, random, Bayesian), the confirmation against
greedy by hand, resuming from a checkpoint and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.lmkit import tiny_lm

from exitwise.errors import ConfigError
from exitwise.generation import bayes_search_skip_layers, generate
from exitwise.generation import skip_bayes as sb
from exitwise.generation.gaussian_process import ucb_argmax
from exitwise.generation.layer_skip import check_skip, skip_units

PROMPTS = torch.tensor([[0, 5, 17, 42], [9, 3, 3, 8]])
MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", layers=5)


def test_point_skip_threshold_by_hand():
    units = skip_units(5)  # attentions of blocks 1..3, then their MLPs
    assert units == [((1, "attn"),), ((2, "attn"),), ((3, "attn"),),
                     ((1, "mlp"),), ((2, "mlp"),), ((3, "mlp"),)]
    # above 0.5 is skipped; exactly 0.5 is not
    x = [0.9, 0.5, 0.51, 0.0, 1.0, 0.2]
    assert sb.point_skip(x, units) == [(1, "attn"), (2, "mlp"), (3, "attn")]
    assert sb.skip_point([(1, "attn"), (2, "mlp"), (3, "attn")], units) == [1, 0, 1, 0, 1, 0]
    blocks = skip_units(5, sublayers=False)
    assert sb.point_skip([0.6, 0.4, 0.7], blocks) == [(1, "attn"), (1, "mlp"), (3, "attn"),
                                                      (3, "mlp")]
    # a block unit counts as skipped only when both of its sub-layers are
    assert sb.skip_point([(1, "attn"), (1, "mlp"), (2, "attn")], blocks) == [1, 0, 0]
    with pytest.raises(ConfigError, match="one coordinate per unit"):
        sb.point_skip([0.9], units)


def test_default_probes():
    assert sb.default_probes(5) == [[1], [1, 3]]
    assert sb.default_probes(30) == [[1, 9, 17, 25], list(range(1, 29, 4)),
                                     list(range(1, 29, 2))]
    assert sb.default_probes(4) == [[1]]  # the same set once


def test_ucb_argmax_by_hand():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    query = torch.tensor([[0.0], [1.0], [6.0]], dtype=torch.float64)
    # kappa 0: the highest posterior mean, at the better observed point
    assert ucb_argmax(x, y, query, 0.0) == 1
    # a large kappa: the point far from every observation (std near 1, the others near 0)
    assert ucb_argmax(x, y, query, 100.0) == 2


def test_next_point_is_in_the_cube_and_reproducible():
    import random

    xs = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], dtype=torch.float64)
    ys = torch.tensor([2.0, 1.0], dtype=torch.float64)
    a = sb.next_point(xs, ys, random.Random(3))
    assert a == sb.next_point(xs, ys, random.Random(3))
    assert len(a) == 4 and all(0.0 <= v <= 1.0 for v in a)


def test_time_decoding_counts_tokens_over_the_clock(lm):
    ticks = iter(range(100))
    rows = sb._rows(PROMPTS, MASK)
    assert [r.shape[1] for r in rows] == [3, 4]  # padding removed
    tokens, seconds = sb.time_decoding(lm, rows, lambda: 0.25 * next(ticks), max_new_tokens=5,
                                       eos_token_id=[])
    assert tokens == 10  # 5 per prompt, nothing ends early
    assert seconds == pytest.approx(0.5)  # each call: two ticks, 0.25 s apart


def _fake_clock(rates, greedy_rate, calls):
    """time_decoding replaced: a set's tokens/s from ``rates(skip)``, greedy's fixed."""

    def fake(model, rows, timer, **options):
        calls.append(options.get("skip"))
        skip = options.get("skip")
        rate = greedy_rate if skip is None else rates(check_skip(skip, 5))
        return 12, 12 / rate

    return fake


def test_schedule_and_confirmation_by_hand(lm, monkeypatch):
    calls: list = []
    # tokens/s: 10 + 5 per skipped MLP - 1 per skipped attention
    rate = lambda skip: 10 + sum(5 if p == "mlp" else -1 for _, p in skip)  # noqa: E731
    monkeypatch.setattr(sb, "time_decoding", _fake_clock(rate, 14.0, calls))
    found = bayes_search_skip_layers(lm, PROMPTS, MASK, probes=[[2], {"mlp": [1]}],
                                     init_points=1, n_iter=2, confirm=3, progress=False)
    hist = found.history
    assert [e["how"] for e in hist] == ["probe", "probe", "random", "bayes", "bayes"]
    assert hist[0]["skip"] == {"attn": [2], "mlp": [2]} and hist[0]["tokens_per_s"] == 14.0
    assert hist[1]["skip"] == {"attn": [], "mlp": [1]} and hist[1]["tokens_per_s"] == 15.0
    for e in hist:
        skip = check_skip(e["skip"], 5)
        assert e["tokens_per_s"] == pytest.approx(rate(skip))
        assert sb.point_skip(e["x"], skip_units(5)) == skip
    best = max(hist, key=lambda e: e["tokens_per_s"])
    assert found.fastest == best["skip"]
    # one warm-up call, one per evaluation, then 3 x (greedy, fastest)
    assert len(calls) == 1 + 5 + 6 and calls[0] is None
    assert found.confirmation["greedy"] == [14.0] * 3
    assert found.tokens_per_s == pytest.approx(best["tokens_per_s"])
    assert found.speedup_vs_greedy == pytest.approx(best["tokens_per_s"] / 14.0)
    assert found.skip == found.fastest  # at least 15 tok/s against greedy's 14


def test_no_set_pays_leaves_skip_empty(lm, monkeypatch):
    monkeypatch.setattr(sb, "time_decoding", _fake_clock(lambda skip: 9.0, 10.0, []))
    found = bayes_search_skip_layers(lm, PROMPTS, n_iter=1, confirm=1, progress=False)
    assert found.skip == {} and found.fastest
    assert found.speedup_vs_greedy == pytest.approx(0.9)


def test_a_point_naming_no_set_is_not_decoded(lm, monkeypatch):
    calls: list = []
    monkeypatch.setattr(sb, "time_decoding", _fake_clock(lambda skip: 7.0, 5.0, calls))
    monkeypatch.setattr(sb, "next_point", lambda xs, ys, rng: [0.2] * xs.shape[1])
    found = bayes_search_skip_layers(lm, PROMPTS, probes=[[1]], n_iter=1, confirm=1,
                                     progress=False)
    last = found.history[-1]
    assert last["skip"] == {"attn": [], "mlp": []} and last["tokens"] == 0
    assert last["tokens_per_s"] == 7.0  # the lowest score so far
    assert len(calls) == 1 + 1 + 2  # warm-up, the probe, the confirmation


def test_checkpoint_resumes_and_survives_an_interruption(lm, monkeypatch, tmp_path):
    path = tmp_path / "search.json"
    calls: list = []
    fake = _fake_clock(lambda skip: 10.0 + len(skip), 5.0, calls)
    monkeypatch.setattr(sb, "time_decoding", fake)
    first = bayes_search_skip_layers(lm, PROMPTS, n_iter=2, confirm=1, checkpoint=path,
                                     progress=False)
    assert len(json.loads(path.read_text())["evaluations"]) == len(first.history) == 2 + 2
    calls.clear()
    more = bayes_search_skip_layers(lm, PROMPTS, n_iter=4, confirm=1, checkpoint=path,
                                    progress=False)
    assert more.history[:4] == first.history
    assert len(more.history) == 6 and len(calls) == 1 + 2 + 2  # only the 2 new points

    # an interruption during the 3rd evaluation keeps the first two
    other = tmp_path / "interrupted.json"
    seen: list = []

    def breaks(model, rows, timer, **options):
        seen.append(1)
        if len(seen) == 4:  # warm-up, two evaluations, then the third
            raise KeyboardInterrupt
        return fake(model, rows, timer, **options)

    monkeypatch.setattr(sb, "time_decoding", breaks)
    with pytest.raises(KeyboardInterrupt):
        bayes_search_skip_layers(lm, PROMPTS, n_iter=2, checkpoint=other, progress=False)
    assert len(json.loads(other.read_text())["evaluations"]) == 2

    with pytest.raises(ConfigError, match="another search"):
        bayes_search_skip_layers(lm, PROMPTS, n_iter=2, sublayers=False, checkpoint=path,
                                 progress=False)


def test_bayesian_steps_find_the_best_set_of_a_small_space(lm, monkeypatch):
    # 6 units, 63 non-empty sets; the best skips exactly the MLPs of blocks 1 and 3
    target = {(1, "mlp"), (3, "mlp")}
    rate = lambda skip: 20.0 - 3.0 * len(target ^ set(skip))  # noqa: E731
    monkeypatch.setattr(sb, "time_decoding", _fake_clock(rate, 10.0, []))
    found = bayes_search_skip_layers(lm, PROMPTS, probes=[[2]], n_iter=15, confirm=1,
                                     seed=4, progress=False)
    assert found.fastest == {"attn": [], "mlp": [1, 3]}


def test_real_search_on_a_tiny_model(lm):
    found = bayes_search_skip_layers(lm, PROMPTS, MASK, max_new_tokens=6, n_iter=1, confirm=1,
                                     progress=False, eos_token_id=[])
    assert len(found.history) == 3  # two default probes ([1], [1, 3]), one Bayesian point
    assert all(e["tokens"] == 12 for e in found.history if e["skip"] != {"attn": [],
                                                                         "mlp": []})
    assert found.tokens_per_s > 0 and found.greedy_tokens_per_s > 0
    # the fastest set decodes exactly as greedy does
    ref = generate(lm, PROMPTS, MASK, max_new_tokens=6, eos_token_id=[])
    out = generate(lm, PROMPTS, MASK, strategy="layer_skip", skip=found.fastest,
                   max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out.sequences, ref.sequences)


def test_errors(lm):
    with pytest.raises(ConfigError, match="confirm"):
        bayes_search_skip_layers(lm, PROMPTS, confirm=0)
    with pytest.raises(ConfigError, match="n_iter"):
        bayes_search_skip_layers(lm, PROMPTS, n_iter=-1)
    with pytest.raises(ConfigError, match="nothing to search"):
        bayes_search_skip_layers(lm, PROMPTS, probes=[], n_iter=0)
    with pytest.raises(ConfigError, match="shape"):
        bayes_search_skip_layers(lm, PROMPTS, MASK[:, :2])
    with pytest.raises(ConfigError, match="blocks"):
        bayes_search_skip_layers(lm, PROMPTS, probes=[[0]])
    with pytest.raises(ConfigError, match="at least 3 blocks"):
        bayes_search_skip_layers(tiny_lm("llama", layers=2), PROMPTS)

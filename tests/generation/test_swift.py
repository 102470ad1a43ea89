"""SWIFT's on-the-fly skip search (``exitwise.generation.swift``): decoding stays lossless for
every decoder family while the search runs (batch 1 and a padded 3); the matchness score
equals an independent computation on a prompt-only cache; the keep / stop rules, the
Bayesian step's schedule and the Gaussian process by hand; the search persists across calls;
clear errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, PAD, left_padded, tiny_lm

import exitwise as ew
from exitwise.backbones.hf_decoder import DecodeContext, prompt_positions
from exitwise.errors import ConfigError
from exitwise.generation import (
    DecodeSession,
    GenerationStats,
    SwiftSearch,
    generate,
    get_decoding_strategy,
    swift_search,
)
from exitwise.generation import swift as swift_mod
from exitwise.generation.layer_skip import check_skip
from exitwise.generation.swift import SwiftDrafter, bayes_suggest, gp_posterior, window_matchness


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def lm(request):
    return tiny_lm(request.param, layers=6)


@pytest.mark.parametrize("batch", ["single", "padded3"])
def test_swift_is_lossless_while_it_searches(lm, batch):
    ids, mask = left_padded()
    if batch == "single":
        ids, mask = ids[:1], mask[:1]
    ref = generate(lm, ids, mask, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD,
                   kernels="stock")
    # a window of 3 tokens: the search starts after 4 generated tokens and runs every step
    seed = int(batch == "single")
    for draft_len, threshold, tree in ((2, None, 1), ("auto", None, 1), (4, "auto", 1),
                                       (3, None, "confidence"), ("auto", None, "confidence")):
        out = generate(lm, ids, mask, strategy="swift", draft_len=draft_len, context_window=3,
                       search_seed=seed, max_new_tokens=16, eos_token_id=EOS,
                       pad_token_id=PAD, draft_threshold=threshold, tree_width=tree)
        assert torch.equal(out.sequences, ref.sequences), (draft_len, threshold, tree)
    search = swift_search(lm, context_window=3, seed=seed)
    assert search.opt_iter > 0 and search.observed  # the search really ran
    assert search.skip != check_skip([1, 3], 6)  # the first candidate scored replaced it
    assert out.stats.total_drafted > 0


def _decoded_session(model, ids, mask, steps):
    """A session after prefill and ``steps`` plain greedy steps (the cache as decoding leaves
    it: prompt slots, then one slot per generated token)."""
    bb = ew.wrap_backbone(model)
    b = ids.shape[0]
    stats = GenerationStats("swift", bb.num_layers, drafted=[0] * b, accepted=[0] * b)
    session = DecodeSession(bb, ids, mask, 64, set(), PAD, stats)
    nxt = session.prefill().argmax(-1)
    session.pending = nxt
    session.emit([[t] for t in nxt.tolist()])
    for _ in range(steps):
        ctx = session.context(0, 1)
        hidden = bb.run_layers(bb.embed(session.pending[:, None], ctx.positions), 0,
                               bb.num_layers, ctx)
        nxt = bb.lm_logits(bb.final_norm(hidden[:, -1])).argmax(-1)
        session.commit(session.pending[:, None], torch.ones(b, 1, dtype=torch.long),
                       torch.ones(b, dtype=torch.long), nxt)
        session.emit([[t] for t in nxt.tolist()])
    return bb, session


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("skip", [[2, 3], {"attn": [2, 4], "mlp": [3]}])
def test_matchness_equals_scoring_on_a_prompt_only_cache(family, skip):
    """The score read off a session mid-decoding (generated slots masked out) equals scoring
    the window on a fresh cache holding only the prompt, row by row, one kept sub-layer at a
    time; the cache is unchanged."""
    model = tiny_lm(family, layers=6)
    ids, mask = left_padded(lengths=(6, 3, 5))
    window = 4
    gone = set(check_skip(skip, 6))
    bb, session = _decoded_session(model, ids, mask, steps=window + 3)
    drafter = SwiftDrafter(SwiftSearch(bb.num_layers, context_window=window))
    drafter.set_skip(skip)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in session.cache.layers]
    counted = session.stats.draft_sublayer_applications
    got = window_matchness(session, drafter, window)
    # 3 rows x (window + 1) positions through the 12 - |skip| kept sub-layers
    assert session.stats.draft_sublayer_applications - counted == 3 * (window + 1) * (
        12 - len(gone))
    for layer, (k, v) in zip(session.cache.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)

    hits = total = 0
    for r in range(ids.shape[0]):
        m = mask[r : r + 1]
        p_ids = ids[r : r + 1]
        cache = bb.new_cache()
        pos = prompt_positions(m)
        ctx = DecodeContext(cache, pos, m, pos)
        bb.run_layers(bb.embed(p_ids.clamp(min=0), pos), 0, bb.num_layers, ctx)
        gen = torch.tensor([session.generated[r][: window + 1]])
        new_pos = m.sum(1, keepdim=True) + torch.arange(window + 1)
        full_mask = torch.cat([m, torch.ones(1, window + 1, dtype=m.dtype)], 1)
        ctx = DecodeContext(cache, new_pos, full_mask, torch.cat([pos, new_pos], 1))
        hidden = bb.embed(gen, new_pos)
        for i in range(bb.num_layers):  # an independent path through the kept sub-layers
            for part in ("attn", "mlp"):
                if (i, part) not in gone:
                    hidden = bb.run_part(i, part, hidden, ctx)
        pred = bb.lm_logits(bb.final_norm(hidden[:, :-1])).argmax(-1)[0]
        hits += int((pred == gen[0, 1:]).sum())
        total += window
    assert got == pytest.approx(hits / total)
    # rows that have not generated more than window + 1 tokens are not scored
    assert window_matchness(session, drafter, window + 3) is None


def test_keep_and_stop_rules_by_hand():
    # whole blocks: both sub-layers of int(8 * 0.45) = 3 of blocks 1..8
    s = SwiftSearch(10, bayes=False, sublayers=False)
    assert s.skip == check_skip([1, 3, 5, 7], 10) and s.set_size == 3
    cand = s.candidate()
    assert len(cand) == 6 and {b for b, _ in cand} == {b for b, p in cand if p == "mlp"}
    # sub-layers (the default): int(16 * 0.45) = 7 of the 16 sub-layers of blocks 1..8
    s = SwiftSearch(10, max_tolerance_iter=2, bayes=False)
    assert s.skip == check_skip([1, 3, 5, 7], 10) and s.set_size == 7
    assert len(s.candidates) == 16
    scores = iter([0.5, 0.4, 0.6, 0.6, 0.1, 0.2])
    seen = []

    def score_of(cand):
        seen.append(cand)
        assert len(cand) == 7 and cand == check_skip(cand, 10)  # distinct, sorted, in 1..8
        return next(scores)

    assert s.iterate(score_of) and s.skip == seen[0] and s.best_score == 0.5
    assert not s.iterate(score_of) and s.skip == seen[0] and s.tolerance_iter == 1
    assert s.iterate(score_of) and s.skip == seen[2] and s.tolerance_iter == 0
    for _ in range(3):  # 0.6 is not above 0.6: tolerance 1, 2, 3 > 2 -> stop
        assert not s.iterate(score_of)
    assert not s.active and s.stopped_by == "tolerance" and s.skip == seen[2]
    assert s.opt_iter == 6 and [c for c, _ in s.observed] == seen

    s = SwiftSearch(10, max_score=0.9)
    s.iterate(lambda c: 0.95)
    assert not s.active and s.stopped_by == "max_score" and s.best_score == 0.95
    s = SwiftSearch(10, max_opt_iter=2, bayes=False)
    for _ in range(3):
        s.iterate(lambda c: 0.1)
    assert s.stopped_by == "max_opt_iter"
    assert not s.iterate(lambda c: None) and s.opt_iter == 3  # nothing to score: no iteration


def test_bayesian_step_comes_every_bayes_interval(monkeypatch):
    calls = []

    def fake_suggest(observed, blocks, size, rng):
        calls.append(len(observed))
        return blocks[:size]

    monkeypatch.setattr(swift_mod, "bayes_suggest", fake_suggest)
    s = SwiftSearch(12, bayes_interval=4)
    for _ in range(9):
        s.iterate(lambda c: 0.1)
    assert calls == [3, 7]  # iterations 4 and 8 ((opt_iter + 1) % 4 == 0)
    s = SwiftSearch(12, bayes_interval=4, bayes=False)
    for _ in range(9):
        s.iterate(lambda c: 0.1)
    assert calls == [3, 7]


def test_gp_posterior_by_hand():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    r = math.sqrt(5.0)  # distance 1, length 1
    k01 = (1 + r + r * r / 3) * math.exp(-r)
    a = 1.0 + 0.01  # diagonal with the noise
    det = a * a - k01 * k01
    inv = [[a / det, -k01 / det], [-k01 / det, a / det]]
    alpha = [inv[0][0] * 1 - inv[0][1], inv[1][0] * 1 - inv[1][1]]
    # at x = 0: k* = [1, k01]
    mean0 = alpha[0] + k01 * alpha[1]
    var0 = 1 - (1 * (inv[0][0] + k01 * inv[0][1]) + k01 * (inv[1][0] + k01 * inv[1][1]))
    mean, std, loglik = gp_posterior(x, y, x[:1], 1.0)
    assert float(mean[0]) == pytest.approx(mean0, rel=1e-9)
    assert float(std[0]) ** 2 == pytest.approx(var0, rel=1e-6)
    quad = alpha[0] * 1 + alpha[1] * -1
    assert loglik == pytest.approx(-0.5 * quad - 0.5 * math.log(det) - math.log(2 * math.pi))


def test_bayes_suggest_follows_the_scores():
    """Scores reward skipping blocks 6..8: after random sets, the suggestion skips them."""
    rng = random.Random(0)
    blocks = list(range(1, 9))
    observed = []
    for _ in range(40):
        cand = sorted(rng.sample(blocks, 3))
        observed.append((cand, sum(b >= 6 for b in cand) / 3))
    got = bayes_suggest(observed, blocks, 3, random.Random(1))
    assert len(got) == 3 and got == sorted(set(got)) and set(got) <= set(blocks)
    assert set(got) == {6, 7, 8}


def test_bayes_suggest_over_sub_layers():
    """Units are sub-layers (1-tuples); scores reward skipping the MLPs of blocks 6..8, and a
    set counts a unit only when it holds all of it."""
    rng = random.Random(0)
    units = [((b, p),) for p in ("attn", "mlp") for b in range(1, 9)]
    observed = []
    for _ in range(60):
        cand = sorted(sub for unit in rng.sample(units, 3) for sub in unit)
        observed.append((cand, sum(b >= 6 and p == "mlp" for b, p in cand) / 3))
    got = bayes_suggest(observed, units, 3, random.Random(1))
    assert got == [((6, "mlp"),), ((7, "mlp"),), ((8, "mlp"),)]


def test_search_persists_across_calls():
    model = tiny_lm("llama", layers=6)
    ids, mask = left_padded()
    opts = dict(context_window=2, max_score=1.0)  # a score cannot exceed 1: never stops early
    generate(model, ids, mask, strategy="swift", max_new_tokens=10, eos_token_id=[],
             pad_token_id=PAD, **opts)
    search = swift_search(model, **opts)
    first = search.opt_iter
    assert first > 0
    generate(model, ids, mask, strategy="swift", max_new_tokens=10, eos_token_id=[],
             pad_token_id=PAD, **opts)
    assert search.opt_iter > first
    assert swift_search(model, context_window=3) is not search  # other options, other search


def test_clear_errors():
    with pytest.raises(ConfigError, match="skip_ratio"):
        get_decoding_strategy("swift", skip_ratio=1.5)
    with pytest.raises(ConfigError, match="context_window"):
        get_decoding_strategy("swift", context_window=0)
    with pytest.raises(ConfigError, match="sublayers"):
        get_decoding_strategy("swift", sublayers="yes")
    with pytest.raises(ConfigError, match="at least 3 blocks"):
        generate(tiny_lm("llama", layers=2), torch.tensor([[5, 6]]), strategy="swift",
                 max_new_tokens=2, eos_token_id=[])
    with pytest.raises(ConfigError, match="unknown SWIFT option"):
        swift_search(tiny_lm("llama", layers=4), window=3)

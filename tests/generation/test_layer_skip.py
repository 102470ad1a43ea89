"""Draft & Verify's layer-skipping drafts (``exitwise.generation.layer_skip``): the drafts are
the model-minus-blocks' greedy tokens, the cache is left as found, decoding is lossless for
every decoder family (batch 1 and a padded 3), the offline search by hand on its objective."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, PAD, left_padded, tiny_lm

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.generation import (
    DecodeSession,
    GenerationStats,
    LayerSkipDrafter,
    generate,
    search_skip_layers,
)
from exitwise.generation.layer_skip import estimated_speedup


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def lm(request):
    return tiny_lm(request.param, layers=5)


@pytest.mark.parametrize("batch", ["single", "padded3"])
def test_layer_skip_drafting_is_lossless(lm, batch):
    ids, mask = left_padded()
    if batch == "single":
        ids, mask = ids[:1], mask[:1]
    ref = generate(lm, ids, mask, max_new_tokens=14, eos_token_id=EOS, pad_token_id=PAD,
                   kernels="stock")
    for skip, draft_len in (([2], 3), ([1, 3], 2), ([2, 3], "auto")):
        out = generate(lm, ids, mask, strategy="layer_skip", skip=skip, draft_len=draft_len,
                       max_new_tokens=14, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(out.sequences, ref.sequences), (skip, draft_len)
        assert out.stats.head_applications == 0 and out.stats.ngram_drafted == 0
    assert out.stats.total_drafted > 0


def test_skipping_identity_blocks_drafts_exactly_the_greedy_tokens():
    """Blocks 1 and 3 made identities (their output projections zeroed): the model without
    them is the model itself, so every draft must be the full model's greedy token -- which
    checks the drafting through the kept blocks' cache and its roll-back; the cache is left
    exactly as found."""
    model = tiny_lm("llama", layers=5)
    with torch.no_grad():
        for i in (1, 3):
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    bb = ew.wrap_backbone(model)
    ids = torch.tensor([[5, 17, 42, 8]])
    greedy = generate(model, ids, max_new_tokens=5, eos_token_id=[], kernels="stock")
    stats = GenerationStats("layer_skip", bb.num_layers, drafted=[0], accepted=[0])
    session = DecodeSession(bb, ids, torch.ones_like(ids), 8, set(), PAD, stats)
    first = session.prefill().argmax(-1)
    session.pending = first
    session.emit([[int(first)]])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in session.cache.layers]
    (drafts,) = LayerSkipDrafter([1, 3], bb.num_layers).propose_rows(session, [4])
    for layer, (k, v) in zip(session.cache.layers, before):  # nothing left behind
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert [int(first)] + drafts == greedy.sequences[0, 4:].tolist()
    out = generate(model, ids, strategy="layer_skip", skip=[1, 3], draft_len=4,
                   max_new_tokens=12, eos_token_id=[])
    assert out.stats.acceptance_rate == 1.0 and out.stats.total_drafted > 0


def test_estimated_speedup_by_hand():
    # a = 0.5, draft pass = 0.25 of a full pass: k = 1 -> 1.5 / 1.25 = 1.2; k = 2 -> 1.75 /
    # 1.5 = 1.1667; so 1.2
    assert estimated_speedup(0.5, 0.25, max_len=4) == pytest.approx(1.2)
    assert estimated_speedup(0.0, 0.25) == 1.0  # never kept: plain decoding


def test_search_keeps_the_best_set_by_its_objective():
    model = tiny_lm("qwen2", layers=6)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 6), generator=g)
    found = search_skip_layers(model, ids, max_new_tokens=10, patience=3)
    assert found.history and all(1 <= i <= 4 for i in found.skip)
    best = max(found.history, key=lambda h: h["estimated_speedup"])
    # the best set of the search (here a damped model: skipping pays), scored as stated
    assert found.skip and found.skip == best["skip"]
    kept = (6 - len(found.skip)) / 6
    assert found.estimated_speedup == pytest.approx(estimated_speedup(found.agreement, kept))
    # each step adds one block to the previous set
    for a, b in zip(found.history, found.history[1:]):
        assert set(a["skip"]) < set(b["skip"]) and len(b["skip"]) == len(a["skip"]) + 1


def test_bad_skip_sets_are_refused():
    model = tiny_lm("llama", layers=5)
    ids = torch.tensor([[3, 4, 5]])
    for skip in ([0], [4], [], [9]):
        with pytest.raises(ConfigError, match="skip"):
            generate(model, ids, strategy="layer_skip", skip=skip)
    with pytest.raises(ConfigError, match="skip="):
        generate(model, ids, strategy="layer_skip")

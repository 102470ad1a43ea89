"""Draft & Verify's layer-skipping drafts (``exitwise.generation.layer_skip``): the drafts are
the model-minus-sub-layers' greedy tokens, the cache is left as found, decoding is lossless for
every decoder family (batch 1 and a padded 3) with whole blocks and single sub-layers
skipped, the skip-set forms, the cost share by hand, the offline search on its objective."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, PAD, VOCAB, left_padded, tiny_lm

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.generation import (
    DecodeSession,
    GenerationStats,
    LayerSkipDrafter,
    generate,
    search_skip_layers,
)
from exitwise.generation.token_tree import confidence_widths
from exitwise.generation.layer_skip import (
    DraftThreshold,
    _agreement,
    check_skip,
    draft_threshold,
    estimated_speedup,
    kept_share,
    skip_plan,
    skip_spec,
)


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
    for skip, draft_len, threshold in (
            ([2], 3, None), ([1, 3], 2, None), ([2, 3], "auto", None),
            ({"attn": [1, 2]}, 3, None), ({"mlp": [3]}, 2, None),
            ([(1, "attn"), (3, "mlp"), 2], "auto", None),
            ([2], 8, "auto"), ({"attn": [1, 3]}, "auto", 0.02)):  # stopped by confidence
        for tree in (1, 3, "confidence"):  # chains, token trees of the draft's choices
            out = generate(lm, ids, mask, strategy="layer_skip", skip=skip,
                           draft_len=draft_len, draft_threshold=threshold, tree_width=tree,
                           max_new_tokens=14, eos_token_id=EOS, pad_token_id=PAD)
            assert torch.equal(out.sequences, ref.sequences), (skip, draft_len, threshold, tree)
            assert out.stats.head_applications == 0 and out.stats.ngram_drafted == 0
            assert tree != 1 or out.stats.sibling_accepted == 0
    assert out.stats.total_drafted > 0


def _with_identity_blocks(*blocks: int):
    """A tiny 5-block Llama whose ``blocks`` add nothing to the residual stream (attention
    and MLP output projections zeroed): the model without them is the model itself."""
    model = tiny_lm("llama", layers=5)
    with torch.no_grad():
        for i in blocks:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _after_first_token(model, new_tokens):
    """A one-row session right after prefill (the first token emitted and pending), the
    model's greedy continuation of ``new_tokens`` and a copy of the cache as it stands."""
    bb = ew.wrap_backbone(model)
    ids = torch.tensor([[5, 17, 42, 8]])
    greedy = generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], kernels="stock")
    stats = GenerationStats("layer_skip", bb.num_layers, drafted=[0], accepted=[0])
    session = DecodeSession(bb, ids, torch.ones_like(ids), 8, set(), PAD, stats)
    first = session.prefill().argmax(-1)
    session.pending = first
    session.emit([[int(first)]])
    before = [(layer.keys.clone(), layer.values.clone()) for layer in session.cache.layers]
    return bb, ids, greedy, session, first, before


def test_skipping_identity_blocks_drafts_exactly_the_greedy_tokens():
    """Blocks 1 and 3 made identities (their output projections zeroed): the model without
    them is the model itself, so every draft must be the full model's greedy token -- which
    checks the drafting through the kept blocks' cache and its roll-back; the cache is left
    exactly as found."""
    model = _with_identity_blocks(1, 3)
    bb, ids, greedy, session, first, before = _after_first_token(model, 5)
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


def test_skipping_identity_sub_layers_drafts_exactly_the_greedy_tokens():
    """Block 1's attention and block 3's MLP made identities (output projections zeroed):
    skipping exactly those sub-layers drafts the full model's greedy tokens, and the cache
    (block 1's attention never written while drafting, others written and rolled back) is
    left as found; skipping block 1's MLP instead changes the drafts."""
    model = tiny_lm("llama", layers=5)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    bb, ids, greedy, session, first, before = _after_first_token(model, 6)
    drafter = LayerSkipDrafter({"attn": [1], "mlp": [3]}, bb.num_layers)
    assert drafter.attends == [0, 2, 3, 4]
    (drafts,) = drafter.propose_rows(session, [5])
    # 5 passes of 1 row through 10 - 2 sub-layers, counted as the draft model's work
    assert session.stats.draft_sublayer_applications == 5 * 8
    for layer, (k, v) in zip(session.cache.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert [int(first)] + drafts == greedy.sequences[0, 4:].tolist()
    # the same through the drafter's plan, without a cache: exactly the full stack's state,
    # while skipping block 1's MLP (not an identity) changes it
    state = bb.start(input_ids=ids, attention_mask=torch.ones_like(ids))
    ctx = state.shared["ctx"]
    full = bb.run_layers(state.hidden, 0, 5, ctx)
    assert torch.equal(drafter.run(bb, state.hidden, ctx), full)
    other = LayerSkipDrafter({"mlp": [1, 3]}, bb.num_layers)
    assert not torch.allclose(other.run(bb, state.hidden, ctx), full)


def test_skip_sets_in_every_form():
    both = [(2, "attn"), (2, "mlp")]
    assert check_skip([2], 5) == both
    assert check_skip([(2, "mlp"), [2, "attn"]], 5) == both  # pairs, also as JSON lists
    assert check_skip({"attn": [3, 1], "mlp": [1]}, 5) == [(1, "attn"), (1, "mlp"), (3, "attn")]
    assert skip_spec(check_skip({"attn": [3, 1], "mlp": [1]}, 5)) == {"attn": [1, 3], "mlp": [1]}
    # runs of whole kept blocks in one call, a block with one part alone, a gone block nowhere
    assert skip_plan(check_skip([(1, "attn"), 2], 5), 5) == [
        (0, 1, None), (1, 2, "mlp"), (3, 5, None)]
    for bad, match in (([(2, "ffn")], "part"), ({"ffn": [2]}, "keys"), ("2", "list"),
                       ([(0, "attn")], "1..3"), ({"attn": []}, "at least one")):
        with pytest.raises(ConfigError, match=match):
            check_skip(bad, 5)


def test_kept_share_by_hand():
    """tiny Llama: hidden 32, 4 heads of 8, 2 key/value heads, MLP 64 wide, no biases."""
    bb = ew.wrap_backbone(tiny_lm("llama", layers=5))
    attn = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 32  # q, k, v, o, input norm
    mlp = 3 * 32 * 64 + 32  # gate, up, down, post-attention norm
    head = VOCAB * 32
    total = head + 5 * (attn + mlp)
    assert bb.part_sizes() == [(attn, mlp)] * 5
    assert kept_share(bb, check_skip({"attn": [1, 2], "mlp": [3]}, 5)) == pytest.approx(
        (total - 2 * attn - mlp) / total)


@pytest.mark.parametrize("sublayers", [True, False])
def test_search_keeps_the_best_set_by_its_objective(sublayers):
    model = tiny_lm("qwen2", layers=6)
    bb = ew.wrap_backbone(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 6), generator=g)
    found = search_skip_layers(model, ids, max_new_tokens=10, patience=3, sublayers=sublayers,
                               progress=False)
    skipped = check_skip(found.skip, 6)
    assert found.history and all(1 <= b <= 4 for b, _ in skipped)
    best = max(found.history, key=lambda h: h["estimated_speedup"])
    # the best set of the search (here a damped model: skipping pays), scored as stated
    assert found.skip and found.skip == best["skip"]
    assert found.kept_share == pytest.approx(kept_share(bb, skipped))
    assert found.estimated_speedup == pytest.approx(
        estimated_speedup(found.agreement, found.kept_share))
    # the stopping rule: patience (3) additions in a row whose optimistic bound (agreement
    # with every candidate skipped) cannot beat the best so far, or every candidate gone
    floor = kept_share(bb, check_skip([1, 2, 3, 4], 6))
    best_so_far, worse = 1.0, 0
    for h in found.history:
        assert worse < 3
        assert h["optimistic_speedup"] == pytest.approx(estimated_speedup(h["agreement"], floor))
        best_so_far = max(best_so_far, h["estimated_speedup"])
        worse = worse + 1 if h["optimistic_speedup"] <= best_so_far else 0
    assert worse == 3 or len(found.history) == (8 if sublayers else 4)
    # each step adds one candidate (a sub-layer, or a whole block) to the previous set
    sets = [set(check_skip(h["skip"], 6)) for h in found.history]
    for a, b in zip(sets, sets[1:]):
        assert a < b and len(b) == len(a) + (1 if sublayers else 2)
    if not sublayers:
        assert all(len(s) % 2 == 0 and skip_spec(sorted(s))["attn"] == skip_spec(sorted(s))["mlp"]
                   for s in sets)
    # the first addition: the least agreement lost per share of the pass saved (ties: the
    # larger saving, then the first candidate)
    units = ([[(b, p)] for p in ("attn", "mlp") for b in range(1, 5)] if sublayers
             else [[(b, "attn"), (b, "mlp")] for b in range(1, 5)])
    out = generate(model, ids, max_new_tokens=10, eos_token_id=[])
    seqs = out.sequences
    targets = torch.full_like(seqs, -1)
    targets[:, 5:-1] = seqs[:, 6:]
    full = _agreement(bb, seqs, torch.ones_like(seqs), targets, [])
    assert full == 1.0  # teacher-forced, the full model predicts its own greedy tokens
    keys = []
    for i, u in enumerate(units):
        saved = 1.0 - kept_share(bb, u)
        keys.append(((full - _agreement(bb, seqs, torch.ones_like(seqs), targets, u)) / saved,
                     -saved, i))
    first = units[min(keys)[2]]
    assert sets[0] == set(first)
    assert found.history[0]["agreement"] == _agreement(bb, seqs, torch.ones_like(seqs), targets,
                                                       first)


def test_bad_skip_sets_are_refused():
    model = tiny_lm("llama", layers=5)
    ids = torch.tensor([[3, 4, 5]])
    for skip in ([0], [4], [], [9]):
        with pytest.raises(ConfigError, match="skip"):
            generate(model, ids, strategy="layer_skip", skip=skip)
    with pytest.raises(ConfigError, match="skip="):
        generate(model, ids, strategy="layer_skip")


def test_draft_threshold_update_by_hand():
    # Draft & Verify's rule: m <- 0.5 m + 0.5 kept/drafted; up 0.01 while m < 0.9, kept at
    # the longest draft, else down 0.01; value <- 0.9 value + 0.1 new
    th = DraftThreshold()
    th.update(1, 2, 8)  # m = 0.25 -> new 0.81 -> 0.72 + 0.081
    assert th.matchness == pytest.approx(0.25) and th.value == pytest.approx(0.801)
    th.update(8, 8, 8)  # m = 0.625, still below 0.9 -> new 0.811
    assert th.matchness == pytest.approx(0.625) and th.value == pytest.approx(0.802)
    th = DraftThreshold(0.5, matchness=1.0)
    th.update(3, 3, 8)  # m = 1 >= 0.9, shorter than the longest -> new 0.49
    assert th.value == pytest.approx(0.499)
    th.update(8, 8, 8)  # m = 1, the longest draft -> unchanged
    assert th.value == pytest.approx(0.499)
    fixed = DraftThreshold(0.6, adaptive=False)
    fixed.update(0, 4, 8)
    assert fixed.value == 0.6 and fixed.matchness == 0.0
    assert draft_threshold(None) is None
    assert draft_threshold("auto") == DraftThreshold(0.8)
    assert draft_threshold(0.3) == DraftThreshold(0.3, adaptive=False)
    for bad in ("always", 1.5, True):
        with pytest.raises(ConfigError):
            draft_threshold(bad)
    with pytest.raises(ConfigError, match="draft_threshold"):
        generate(tiny_lm("llama", layers=5), torch.tensor([[5, 6]]), strategy="layer_skip",
                 skip=[2], draft_threshold="sometimes")


def test_draft_stops_after_its_first_unsure_token():
    """With identity blocks skipped the draft model is the full model: its drafts are the
    greedy tokens and their probabilities the full model's, read from one forward pass; a
    threshold between two of them stops the draft after the first token below it."""
    model = _with_identity_blocks(1, 3)
    bb, ids, greedy, session, first, before = _after_first_token(model, 6)
    seq = greedy.sequences  # prompt (4), the first token, then the 5 drafts' tokens
    with torch.no_grad():
        probs = model(seq).logits.softmax(-1).amax(-1)[0]
    conf = probs[4:9].tolist()  # draft j (1..5) is predicted at position 3 + j
    low = sorted(conf)
    t = (low[1] + low[2]) / 2  # two drafts below it
    stop = next(j + 1 for j, p in enumerate(conf) if p < t)
    drafter = LayerSkipDrafter([1, 3], bb.num_layers, DraftThreshold(t, adaptive=False))
    (drafts,) = drafter.propose_rows(session, [5])
    assert drafts == seq[0, 5:5 + stop].tolist()  # the unsure token itself is proposed
    assert session.stats.draft_sublayer_applications == stop * drafter.sublayers_run
    for layer, (k, v) in zip(session.cache.layers, before):  # rolled back what it ran
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    adaptive = LayerSkipDrafter([1, 3], bb.num_layers, DraftThreshold())
    adaptive.propose_rows(session, [5])
    adaptive.observe([2], [3])  # m = 1/3 < 0.9 -> up
    assert adaptive.longest == 5 and adaptive.threshold.value == pytest.approx(0.801)


def test_draft_trees_take_the_draft_models_next_choices():
    """With identity blocks skipped the draft model is the full model, so its logits at each
    draft are read from one forward pass: a fixed tree's siblings are the next choices after
    each draft (best first), and SWIFT's widths are confidence_widths of the drafts' top-1
    probabilities (greedy counts; sampling counts when the drafter samples)."""
    model = _with_identity_blocks(1, 3)
    bb, ids, greedy, session, first, before = _after_first_token(model, 5)
    seq = greedy.sequences
    with torch.no_grad():
        logits = model(seq).logits[0, 4:8]  # what drafts 1..4 are chosen from
    top = logits.topk(4).indices  # the draft itself first (no ties here)
    assert top[:, 0].tolist() == seq[0, 5:9].tolist()
    fixed = LayerSkipDrafter([1, 3], bb.num_layers, tree=3)
    (drafts,) = fixed.propose_rows(session, [4])
    assert drafts == seq[0, 5:9].tolist() and fixed.tree_widths == (3, 3, 3, 3)
    assert fixed.tree_siblings[0].tolist() == top[:, 1:3].tolist()
    conf = logits.softmax(-1).amax(-1).tolist()
    swift = LayerSkipDrafter([1, 3], bb.num_layers, tree="confidence")
    swift.propose_rows(session, [4])
    assert swift.tree_widths == confidence_widths(conf)
    assert swift.tree_siblings.shape == (1, 4, max(confidence_widths(conf)) - 1)
    sampled = LayerSkipDrafter([1, 3], bb.num_layers, tree="confidence", sampling=True)
    sampled.propose_rows(session, [4])
    assert sampled.tree_widths == confidence_widths(conf, sampling=True)
    chain = LayerSkipDrafter([1, 3], bb.num_layers)
    chain.propose_rows(session, [4])
    assert chain.tree_siblings is None and chain.tree_widths is None
    for layer, (k, v) in zip(session.cache.layers, before):  # nothing left behind
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    for bad in (0, "wide", 2.5, True):
        with pytest.raises(ConfigError, match="tree_width"):
            LayerSkipDrafter([1], bb.num_layers, tree=bad)
    with pytest.raises(ConfigError, match="tree_width"):
        generate(model, ids, strategy="swift", tree_width="sometimes")

"""Token-tree verification (``exitwise.generation.token_tree``): the tree's layout and the
greedy and sampled acceptance rules against hand-computed values; the tree attention mask
gives every node the logits of feeding its root-to-node path alone (every decoder family,
padded rows, windows exceeded); decoding with trees equals greedy decoding for every family
at batch 1 and a padded batch of 3, with siblings really accepted and the compacted cache
equal to a full recomputation; misuse is refused."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, PAD, VOCAB, full_cache, left_padded, tiny_lm

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.generation import (
    ChainTree,
    DecodeSession,
    GenerationStats,
    accept_greedy,
    generate,
    self_speculative_decode,
)
from exitwise.generation.draft_control import DraftLengthController
from exitwise.generation.exit_drafts import draft_sequentially
from exitwise.generation.sampling import SamplingConfig
from exitwise.generation.token_tree import (
    accept_sampled,
    confidence_widths,
    nominal_width,
    sibling_tokens,
    step_widths,
)
from exitwise.heads.lm import LMHead

NEW = 14


def test_chain_tree_layout_by_hand():
    t = ChainTree(k=2, width=3)
    assert t.size == 7
    # slots: d0, x1, x2, then the two siblings of x1 (depth 1), the two of x2 (depth 2)
    assert t.depths().tolist() == [0, 1, 2, 1, 1, 2, 2]
    assert t.parents() == [-1, 0, 1, 0, 0, 1, 1]
    assert t.sibling_slot(1, 0) == 3 and t.sibling_slot(2, 1) == 6
    anc = t.ancestors()
    assert anc[2].nonzero()[:, 0].tolist() == [0, 1, 2]
    assert anc[4].nonzero()[:, 0].tolist() == [0, 4]  # x1's sibling: d0 and itself
    assert anc[5].nonzero()[:, 0].tolist() == [0, 1, 5]  # x2's sibling hangs under x1
    assert ChainTree(3, 1).size == 4 and ChainTree(3, 1).depths().tolist() == [0, 1, 2, 3]


def test_tree_with_widths_per_depth_by_hand():
    t = ChainTree(k=3, width=(3, 1, 2))
    assert t.size == 7 and t.max_width == 3 and t.widths == (3, 1, 2)
    # slots: d0, x1, x2, x3, then x1's two siblings, none for x2, x3's one
    assert t.depths().tolist() == [0, 1, 2, 3, 1, 1, 3]
    assert t.parents() == [-1, 0, 1, 2, 0, 0, 2]
    assert (t.sibling_slot(1, 0), t.sibling_slot(1, 1), t.sibling_slot(3, 0)) == (4, 5, 6)
    assert t.sibling_slot(torch.tensor([1, 3]), torch.tensor([1, 0])).tolist() == [5, 6]
    assert t.sibling_mask().tolist() == [[True, True], [False, False], [True, False]]
    padded = torch.tensor([[[41, 42], [0, 0], [43, 0]]])
    assert t.flat_siblings(padded).tolist() == [[41, 42, 43]]
    assert t.ancestors()[6].nonzero()[:, 0].tolist() == [0, 1, 2, 6]  # under x2
    # a uniform width written per depth is the same tree
    assert ChainTree(2, (3, 3)).depths().tolist() == ChainTree(2, 3).depths().tolist()
    assert ChainTree(2, (3, 3)).sibling_slot(2, 1) == ChainTree(2, 3).sibling_slot(2, 1)
    with pytest.raises(ConfigError, match="3 widths"):
        ChainTree(3, (2, 2))


def test_confidence_widths_follow_swifts_rule_by_hand():
    """The reference's get_choices_list: strictly above 0.95 / 0.8 / 0.5 -> 3 / 5 / 8, else
    10 candidates (greedy); 1 / 3 / 5 / 10 when sampling."""
    probs = [0.99, 0.95, 0.9, 0.8, 0.6, 0.5, 0.2]
    assert confidence_widths(probs) == (3, 5, 5, 8, 8, 10, 10)
    assert confidence_widths(probs, sampling=True) == (1, 3, 3, 5, 5, 10, 10)
    assert confidence_widths([]) == ()


def test_step_widths_take_the_largest_count_among_rows_still_drafting():
    # depth 1: both rows draft (0.99 -> 3, 0.6 -> 8): 8; depth 2: only row 0 (lengths 2, 1)
    # drafts there (0.85 -> 5; row 1's 0.1 would give 10 but is past its draft): 5
    assert step_widths([[0.99, 0.6], [0.85, 0.1]], [2, 1]) == (8, 5)
    assert step_widths([[0.99, 0.6], [0.85, 0.1]], [2, 1], sampling=True) == (5, 3)
    # no row drafts at a depth: all rows count (the depth is never verified anyway)
    assert step_widths([[0.99, 0.97]], [0, 0]) == (3,)
    assert nominal_width("confidence") == 8.0 and nominal_width("confidence", True) == 5.0
    assert nominal_width(3) == 3.0


def test_padding_past_a_depths_width_is_never_taken():
    """Depth 1 has no siblings (width 1), depth 2 one (width 2); padding entries that equal
    the full model's choice are not slots: greedy never takes them, sampling never tries
    them (the law after rejection stays the residual's)."""
    tree = ChainTree(k=2, width=(1, 2))  # slots: d0, x1, x2, sib(x2)
    drafted = torch.tensor([[10, 11], [10, 11]])
    siblings = torch.tensor([[[20], [21]], [[20], [21]]])  # depth 1's [20] is padding
    target = torch.tensor([[20, 99, 98, 97],  # x1 wrong; the padding holds the right token
                           [10, 21, 98, 32]])  # x1 kept, x2 wrong, its real sibling right
    accepted, path, nxt, took = accept_greedy(tree, drafted, siblings, target,
                                              torch.tensor([2, 2]))
    assert accepted.tolist() == [0, 2] and took.tolist() == [False, True]
    assert nxt.tolist() == [20, 32] and path[1].tolist() == [0, 1, 3]
    # sampling: draft x1 = 0 (point mass), p = (.1, .5, .3, .1); depth 1 has one real
    # sibling (1) and a padding entry (2; depth 2 is wider): x1 kept .1, sibling 1
    # .9 * 5/9 = .5, then the residual without token 1: token 2 .3, token 3 .1, both drawn,
    # never "taken"
    n = 100_000
    two = ChainTree(2, (2, 3))  # slots: d0, x1, x2, sib(x1), sib(x2) x 2
    p0, eye = torch.tensor([0.1, 0.5, 0.3, 0.1]), torch.eye(4)
    p = torch.stack([p0, eye[0], eye[0], eye[1], eye[0], eye[0]])[None].expand(n, 6, 4)
    q = eye[0].expand(n, 2, 4)
    padded = torch.tensor([[[1, 2], [1, 2]]]).expand(n, 2, 2)
    g = torch.Generator().manual_seed(1)
    accepted, path, nxt, took = accept_sampled(two, torch.zeros(n, 2, dtype=torch.long), q,
                                               padded, p, torch.ones(n, dtype=torch.long), g)
    assert (path[took, 1] == 3).all()  # only the real sibling's slot
    tok = torch.where(took, torch.ones_like(nxt), torch.where(accepted == 1, 0, nxt))
    freq = torch.bincount(tok, minlength=4).float() / n
    torch.testing.assert_close(freq, p0, atol=0.006, rtol=0)


def test_sibling_tokens_skip_the_chosen_draft():
    top = torch.tensor([[5, 7, 9], [4, 6, 8]])
    chosen = torch.tensor([5, 3])  # row 0 drafted its top choice; row 1 an n-gram token
    assert sibling_tokens(top, chosen, 2).tolist() == [[7, 9], [4, 6]]


def test_greedy_acceptance_by_hand():
    tree = ChainTree(k=2, width=2)  # slots: d0, x1, x2, sib(x1), sib(x2)
    drafted = torch.tensor([[10, 11], [10, 11], [10, 11], [10, 11]])
    siblings = torch.tensor([[[20], [21]], [[20], [21]], [[20], [21]], [[20], [21]]])
    target = torch.tensor([
        [10, 11, 30, 40, 41],  # chain fully kept: next = argmax after x2
        [20, 99, 98, 31, 41],  # x1 wrong, its sibling 20 right: path d0 -> sib(x1), next 31
        [10, 21, 98, 40, 32],  # x1 kept, x2 wrong, sib(x2) = 21 right: next = argmax there
        [55, 99, 98, 40, 41],  # nothing kept: next = argmax after d0
    ])
    row_len = torch.tensor([2, 2, 2, 2])
    accepted, path, nxt, took = accept_greedy(tree, drafted, siblings, target, row_len)
    assert accepted.tolist() == [2, 1, 2, 0]
    assert nxt.tolist() == [30, 31, 32, 55]
    assert took.tolist() == [False, True, True, False]
    assert path[0].tolist() == [0, 1, 2]
    assert path[1, :2].tolist() == [0, 3]
    assert path[2].tolist() == [0, 1, 4]
    # a row's own draft length caps the chain and its siblings
    capped = accept_greedy(tree, drafted, siblings, target, torch.tensor([1, 0, 1, 2]))
    assert capped[0].tolist() == [1, 0, 1, 0]
    assert capped[2].tolist() == [11, 20, 21, 55]
    # width 1: the plain longest-prefix rule
    chain = accept_greedy(ChainTree(2, 1), drafted, None, target[:, :3], row_len)
    assert chain[0].tolist() == [2, 0, 1, 0] and chain[2].tolist() == [30, 20, 21, 55]


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def lm(request):
    return tiny_lm(request.param)


@pytest.mark.parametrize("width", [3, (2, 1, 4)], ids=["uniform", "per_depth"])
def test_tree_mask_equals_sequential_verification(lm, width):
    """Each node's logits from one tree-masked pass == the model's own forward over the prompt
    followed by that node's root-to-node path (padded rows; prompts past the windows), for a
    uniform width and for widths per depth (SWIFT's trees)."""
    bb = ew.wrap_backbone(lm)
    ids, mask = left_padded((12, 9, 11), seed=5)
    stats = GenerationStats("tree", bb.num_layers)
    session = DecodeSession(bb, ids, mask, 4, set(), PAD, stats)
    first = session.prefill().argmax(-1)
    tree = ChainTree(k=3, width=width)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB, (3, tree.size), generator=g)
    tokens[:, 0] = first
    ctx = session.context(0, tree.size, tree)
    with torch.no_grad():
        hidden = bb.run_layers(bb.embed(tokens, ctx.positions), 0, bb.num_layers, ctx)
        logits = bb.lm_logits(bb.final_norm(hidden))
    parents = tree.parents()
    for r in range(3):
        prompt = ids[r][mask[r].bool()].tolist()
        for slot in range(tree.size):
            path, node = [], slot
            while node >= 0:
                path.insert(0, int(tokens[r, node]))
                node = parents[node]
            with torch.no_grad():
                ref = lm(input_ids=torch.tensor([prompt + path])).logits[0, -1]
            torch.testing.assert_close(logits[r, slot], ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["single", "padded3"])
def test_tree_decoding_equals_greedy(lm, kind):
    ids, mask = left_padded()
    if kind == "single":
        ids, mask = ids[:1], mask[:1]
    opts = dict(max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
    greedy = generate(lm, ids, mask, kernels="stock", **opts)
    for exit_layer, draft_len, width in [(1, 1, 2), (1, 4, 3), (2, 3, 4), (3, 2, 2),
                                         (1, 3, "confidence"), (2, 2, "confidence")]:
        out = generate(lm, ids, mask, strategy="self_speculative", exit_layer=exit_layer,
                       draft_len=draft_len, tree_width=width, **opts)
        assert torch.equal(out.sequences, greedy.sequences), (exit_layer, draft_len, width)
        s = out.stats
        assert 0 <= s.sibling_accepted <= s.total_accepted <= s.total_drafted


def test_siblings_accepted_and_cache_equals_full_recomputation():
    """A ragged batch where siblings were taken: every real slot's keys/values equal the
    model's own forward over the row's final tokens (the accepted path moved into place)."""
    model = tiny_lm("qwen2", seed=2)
    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0] * 3, accepted=[0] * 3)
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats, keep_finished=True)
    head = LMHead(bb.hidden_size, bb.vocab_size, backbone=bb).eval()
    self_speculative_decode(session, head, 1, 3, tree_width=3)
    assert stats.sibling_accepted > 0
    assert (session.mask[:, ids.shape[1]:] == 0).any()  # ragged: holes too
    assert session.cache.get_seq_length(0) == session.mask.shape[1]
    assert session.next_pos.tolist() == session.mask.sum(1).tolist()
    for r in range(3):
        valid = session.mask[r].bool()
        tokens = session.slot_tokens[r][valid]
        assert session.slot_pos[r][valid].tolist() == list(range(int(valid.sum())))
        ref = full_cache(model, tokens[None])
        for layer in range(bb.num_layers):
            mine, theirs = session.cache.layers[layer], ref.layers[layer]
            torch.testing.assert_close(mine.keys[r][:, valid], theirs.keys[0], atol=2e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(mine.values[r][:, valid], theirs.values[0], atol=2e-5,
                                       rtol=1e-4)
        gen = session.generated[r]
        t_real = int(mask[r].sum())
        assert tokens[t_real: t_real + len(gen) - 1].tolist() == gen[:-1]


def test_tree_with_ngrams_and_automatic_length_is_lossless():
    model = tiny_lm("llama", seed=1)
    ids, mask = left_padded((9, 4, 6), seed=3)
    ids = torch.cat([ids, ids[:, -4:]], 1)  # repeated text: n-gram drafts have hits
    mask = torch.cat([mask, torch.ones_like(mask[:, -4:])], 1)
    opts = dict(max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
    greedy = generate(model, ids, mask, kernels="stock", **opts)
    for extra in (dict(draft_len=2, ngram=3), dict(draft_len="auto"),
                  dict(draft_len="auto", ngram=3)):
        for width in (2, "confidence"):
            out = generate(model, ids, mask, strategy="self_speculative", exit_layer=2,
                           tree_width=width, **extra, **opts)
            assert torch.equal(out.sequences, greedy.sequences), (extra, width)


@pytest.mark.parametrize("sampling", [False, True])
def test_exit_confidence_trees_follow_the_exits_own_top1(sampling):
    """An exit head's "confidence" trees: each depth's width is confidence_widths of the
    exit's top-1 probability there, read here from an independent forward (the HF model's
    hidden state after E blocks at each fed chain token, then the head); the siblings are the
    exit's next choices after its draft, best first."""
    model = tiny_lm("llama", seed=4)
    bb = ew.wrap_backbone(model)
    ids = torch.tensor([[5, 9, 13, 21, 34, 55, 8]])
    mask = torch.ones_like(ids)
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0], accepted=[0])
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats)
    head = LMHead(bb.hidden_size, bb.vocab_size, backbone=bb).eval()
    e, k, temperature = 1, 4, 0.01  # a sharp exit: confident and unsure depths both occur
    session.pending = session.prefill(split=e).argmax(-1)
    sampler = SamplingConfig(True, generator=torch.Generator().manual_seed(0)) if sampling \
        else SamplingConfig()
    with torch.inference_mode():
        out = draft_sequentially(session, head, e, k, torch.tensor([k]), torch.tensor([True]),
                                 [[]], torch.tensor([False]), temperature, None, sampler,
                                 stats, tree_width="confidence")
    drafts, siblings, tree = out[2], out[7], out[8]
    chain = [int(session.pending[0])] + [int(t[0]) for t in drafts]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids[0].tolist() + chain[:-1]]),
                       output_hidden_states=True).hidden_states[e][:, -k:]
        logits = head.token_logits(hidden)[0].float() / temperature  # (k, V)
    probs = sampler.probs(logits) if sampling else logits.softmax(-1)
    widths = confidence_widths(probs.amax(-1).tolist(), sampling)
    assert len(set(widths)) > 1  # the rule really varies here
    assert tree.widths == widths and siblings.shape == (1, k, max(widths) - 1)
    for d in range(k):
        order = logits[d].argsort(descending=True).tolist()
        want = [t for t in order if t != chain[d + 1]][: widths[d] - 1]
        assert siblings[0, d, : widths[d] - 1].tolist() == want
        if not sampling:
            assert chain[d + 1] == order[0]  # greedy drafts are the exit's argmax


def test_controller_costs_the_tree_verification_width():
    c = DraftLengthController(max_len=4, tree_width=3)
    c.record_costs(1, 1, verify_s=0.010, draft_s=0.002, draft_passes=1)
    c.record_costs(1, 4, verify_s=0.013, draft_s=0.004, draft_passes=2)  # k = 1: 1 + 3 slots
    # k = 1 verifies 1 + 1 * 3 = 4 slots; k = 2 verifies 7: extrapolated along q = 1 .. 4
    assert c.step_cost(1, 1) == pytest.approx(2 * 0.002 + 0.013)
    assert c.step_cost(1, 2) == pytest.approx(3 * 0.002 + 0.013 + 0.001 * 3)
    # drafts known up front (one pass of k + 1 positions, scaled as verification from 1 to
    # 2: x 1.1 while untimed) get no siblings: a chain of k + 1
    assert c.step_cost(1, 1, "one") == pytest.approx(0.002 * 1.1 + 0.010 + 0.001)


def test_controller_follows_the_measured_positions_of_varying_trees():
    """A draft model's trees (passes "per_draft") cost 1 + k * tree_width positions; a tree
    step of k drafts and q positions moves tree_width by 0.1 of ((q - 1) / k - tree_width);
    drafts fed in one pass (n-grams) stay chains."""
    c = DraftLengthController(max_len=4, tree_width=5)
    assert c.verified_positions(2, "per_draft") == 11 and c.verified_positions(2, "one") == 3
    c.record_tree(2, 7)  # 3 positions per draft: 5 + 0.1 * (3 - 5) = 4.8
    assert c.tree_width == pytest.approx(4.8)
    assert c.verified_positions(2, "per_draft") == 1 + round(9.6)
    fixed = DraftLengthController(tree_width=3)
    fixed.record_tree(4, 13)  # a fixed width stays exactly where it is
    assert fixed.tree_width == 3.0


def test_misuse_is_refused():
    model = tiny_lm("llama")
    ids = torch.tensor([[3, 4, 5, 6]])
    for bad in (0, True, 1.5, "wide"):
        with pytest.raises(ConfigError, match="tree_width"):
            generate(model, ids, strategy="self_speculative", exit_layer=1, tree_width=bad)
    config = ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                           head_kwargs={"adapter": "kangaroo"}, final_head_kwargs={})
    multi = ew.attach_exits(model, config).eval()
    with pytest.raises(ConfigError, match="without a cache of its own"):
        generate(multi, ids, strategy="self_speculative", exit_layer=2, tree_width=2)


def test_sampled_acceptance_tries_siblings_against_the_residual_by_hand():
    """One draft x = 0 from a point-mass q, p = (.1, .5, .3, .1), siblings (1, 2). Kept x:
    p(0) = .1; else r = (0, .5, .3, .1) / .9: sibling 1 kept with r(1) -> .9 * 5/9 = .5;
    then r' = (0, 0, .3, .1) / .4: sibling 2 kept with .75 -> .9 * 4/9 * .75 = .3; the rest
    (token 3) .1. Each kept sibling's next token comes from p at its own slot."""
    n = 200_000
    tree = ChainTree(1, 3)
    p0 = torch.tensor([0.1, 0.5, 0.3, 0.1])
    after = torch.eye(4)  # p after slot s (1..3) is a point mass on token s - 1
    p = torch.stack([p0, after[0], after[1], after[2]])[None].expand(n, 4, 4)
    q = torch.eye(4)[0].expand(n, 1, 4)
    drafted = torch.zeros(n, 1, dtype=torch.long)
    siblings = torch.tensor([[[1, 2]]]).expand(n, 1, 2)
    g = torch.Generator().manual_seed(0)
    accepted, path, nxt, took = accept_sampled(
        tree, drafted, q, siblings, p, torch.ones(n, dtype=torch.long), g)
    # the token emitted first: the kept chain draft, a kept sibling (slots 2, 3 hold tokens
    # 1, 2), or the draw after all were rejected
    kept_chain = (accepted == 1) & ~took
    tok = torch.where(kept_chain, drafted[:, 0], nxt)
    tok = torch.where(took, path[:, 1] - 1, tok)
    freq = torch.bincount(tok, minlength=4).float() / n
    torch.testing.assert_close(freq, p0, atol=0.005, rtol=0)  # sd ~ 0.001
    assert (accepted[took] == 1).all()
    # the next token comes from p at the slot that ended the path (slot s's next token is
    # s - 1 here): a kept sibling's own slot, slot 1 after the kept chain draft
    assert (nxt[took] == path[took, 1] - 1).all()
    assert (nxt[kept_chain] == 0).all()
    # rows that kept nothing draw from the residual without the siblings: token 3 only
    assert (nxt[accepted == 0] == 3).all()

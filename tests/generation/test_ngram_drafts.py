"""ANPD's multi-level n-gram drafts (``exitwise.generation.ngram``) and the strategies that use
them: the tables and the lookup against hand-written values, tables after decoding equal to
tables built from the accepted text (no draft ever leaks in), and lossless decoding for every
decoder family, alone ("anpd") and combined with exit drafts, at batch 1 and a padded 3."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, PAD, left_padded, tiny_lm

from exitwise.errors import ConfigError
from exitwise.generation import (
    DecodeSession,
    DraftLengthController,
    GenerationStats,
    NGramDrafter,
    NGramTables,
    generate,
    self_speculative_decode,
)
from exitwise.heads.lm import LMHead

NEW = 16


def test_tables_and_multi_level_lookup_by_hand():
    t = NGramTables(3, [1, 2, 3, 1, 2, 4])
    # contexts of 1 token: the token that followed them *last*
    assert t.tables[0] == {(1,): 2, (2,): 4, (3,): 1}
    assert t.tables[1] == {(1, 2): 4, (2, 3): 1, (3, 1): 2}
    assert t.next_token([3, 1, 2]) == 4  # the 2-token context (1, 2) wins over (2,) alone
    assert t.next_token([9, 3]) == 1  # (9, 3) unseen: falls back to (3,)
    assert t.next_token([9]) is None
    assert t.propose(3) == []  # context (2, 4) and (4,) never seen
    u = NGramTables(3, [5, 6, 7, 5, 6])
    # (5, 6) -> 7; then (6, 7) -> 5; then (7, 5) -> 6: each prediction extends the context
    assert u.propose(3) == [7, 5, 6]
    assert u.propose(1) == [7] and u.match == 2  # found after the 2-token context (5, 6)
    v = NGramTables(4, [5, 6, 7, 9, 6])
    assert v.propose(2) == [7, 9] and v.match == 1  # only (6,) seen: a 1-token match
    assert v.propose(0) == [] and v.match == 0
    u.update([8])  # (5, 6) -> 8 now (the latest continuation)
    assert u.next_token([5, 6]) == 8 and u.next_token([6]) == 8


def test_bad_order_is_refused():
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ConfigError, match="order"):
            NGramTables(bad)
    with pytest.raises(ConfigError, match="order"):
        generate(tiny_lm("llama"), torch.tensor([[3, 4, 5]]), strategy="anpd", ngram=1)
    with pytest.raises(ConfigError, match="draft_len"):
        generate(tiny_lm("llama"), torch.tensor([[3, 4, 5]]), strategy="anpd", draft_len=0)


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def lm(request):
    return tiny_lm(request.param)


def _opts(kind: str) -> dict:
    return {
        "anpd": dict(strategy="anpd"),
        "anpd3": dict(strategy="anpd", ngram=3, draft_len=3),
        "exit+ngram": dict(strategy="self_speculative", exit_layer=2, draft_len=2, ngram=4),
        "auto+ngram": dict(strategy="self_speculative", exit_layer=1, draft_len="auto", ngram=3),
    }[kind]


@pytest.mark.parametrize("batch", ["single", "padded3"])
def test_ngram_drafting_is_lossless(lm, batch):
    ids, mask = left_padded()
    if batch == "single":
        ids, mask = ids[:1], mask[:1]
    ref = generate(lm, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
                   kernels="stock")
    ngram_drafted = ngram_accepted = 0
    for kind in ("anpd", "anpd3", "exit+ngram", "auto+ngram"):
        out = generate(lm, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
                       **_opts(kind))
        assert torch.equal(out.sequences, ref.sequences), kind
        s = out.stats
        assert s.new_tokens == ref.stats.new_tokens
        assert 0 <= s.ngram_accepted <= s.ngram_drafted <= s.total_drafted
        if kind.startswith("anpd"):
            assert s.ngram_drafted == s.total_drafted  # nothing else drafts
            assert s.head_applications == 0
        ngram_drafted += s.ngram_drafted
        ngram_accepted += s.ngram_accepted
    assert ngram_drafted > 0  # the lookups proposed something on these prompts


def test_tables_after_decoding_equal_tables_of_the_accepted_text():
    """Rejected drafts never enter the tables: after decoding (with rollbacks), each row's
    tables equal tables built afresh from its prompt's real tokens and what it emitted."""
    model = tiny_lm("llama")
    import exitwise as ew

    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    b = ids.shape[0]
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0] * b, accepted=[0] * b)
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats)
    drafter = NGramDrafter(3)
    self_speculative_decode(session, LMHead(32, 100, backbone=bb).eval(), 1, 3,
                            proposer=drafter, proposal_len=4)
    assert stats.ngram_drafted > stats.ngram_accepted  # some n-gram drafts were rejected
    for r in range(b):
        drafter.sync(r, session.generated[r])
        text = ids[r][mask[r].bool()].tolist() + session.generated[r]
        fresh = NGramTables(3, text)
        assert drafter.rows[r].text == text
        assert drafter.rows[r].tables == fresh.tables


def test_no_exit_head_needs_ngram_and_layer_zero():
    model = tiny_lm("llama")
    import exitwise as ew

    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    stats = GenerationStats("anpd", bb.num_layers, drafted=[0] * 3, accepted=[0] * 3)
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats)
    with pytest.raises(ConfigError, match="n-gram"):
        self_speculative_decode(session, None, 0, 3)


def test_automatic_lengths_keep_ngram_acceptance_per_match_length():
    """With draft_len="auto", n-gram drafts inform the acceptance of their match's level
    ("ngram/2", "ngram/1" for order 3), never one pooled rate; only rows that drafted from a
    level count there (at most the rows the drafter found at that level)."""
    import exitwise as ew

    class Logged(NGramDrafter):
        def propose_rows(self, session, caps):
            out = super().propose_rows(session, caps)
            found.extend(n for n in self.row_levels if n is not None)
            return out

    found: list[str] = []
    model = tiny_lm("llama")
    bb = ew.wrap_backbone(model)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    mask = torch.ones_like(ids)
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0], accepted=[0])
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats)
    controller = DraftLengthController(max_len=3, discount=1.0)
    drafter = Logged(3)
    assert drafter.levels == ["ngram/2", "ngram/1"]
    self_speculative_decode(session, None, 0, 0, proposer=drafter, controller=controller)
    assert found and "ngram" not in controller.reached
    assert set(controller.reached) <= set(drafter.levels)
    for level in drafter.levels:  # reached[0]: rows that drafted from that level
        first = controller.reached.get(level, [0.0])[0]
        assert 0 <= first <= found.count(level)
    assert sum(controller.reached[n][0] for n in controller.reached) > 0


def test_lengths_are_chosen_only_for_the_levels_found():
    """With draft_len="auto", continuations are looked up first and a length is chosen for
    exactly the levels some row found one at (no choosing for levels nobody has)."""
    import exitwise as ew

    chosen: dict[int, set[str]] = {}
    found: dict[int, set[str]] = {}

    class Counting(DraftLengthController):
        def choose(self, rows, source="exit", passes="per_token"):
            chosen.setdefault(self.steps, set()).add(source)
            return super().choose(rows, source, passes)

    class Logged(NGramDrafter):
        def propose_rows(self, session, caps):
            out = super().propose_rows(session, caps)
            found[controller.steps] = {n for n in self.row_levels if n is not None}
            return out

    model = tiny_lm("llama")
    bb = ew.wrap_backbone(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([[5, 6, 7, 8] * 3]), torch.randint(3, 100, (2, 12), generator=g)])
    stats = GenerationStats("anpd", bb.num_layers, drafted=[0] * 3, accepted=[0] * 3)
    session = DecodeSession(bb, ids, torch.ones_like(ids), NEW, set(), PAD, stats)
    controller = Counting(max_len=3)
    self_speculative_decode(session, None, 0, 0, proposer=Logged(3), controller=controller)
    assert any(found.values()) and not all(found.values())  # steps with and without
    assert all(chosen.get(step, set()) == levels for step, levels in found.items())


def test_accepted_counts_only_drafts_a_row_emitted():
    # a prompt that ends in a loop, so n-gram drafts of 6 are accepted whole; an EOS inside an
    # accepted draft ends the row there, and the drafts after it are not counted as accepted
    # (they were confirmed but never emitted): each step emits its accepted drafts and, unless
    # the row ended inside them, one token of the full model's own
    model = tiny_lm("llama")
    seed = torch.tensor([[11, 45, 77, 23]])
    ids = generate(model, seed, None, max_new_tokens=30, eos_token_id=[]).sequences
    free = generate(model, ids, None, strategy="anpd", ngram=3, draft_len=6,
                    max_new_tokens=12, eos_token_id=[])
    tokens = free.sequences[0, ids.shape[1]:].tolist()
    assert free.stats.accepted[0] > 0
    for eos in tokens[1:6]:
        out = generate(model, ids, None, strategy="anpd", ngram=3, draft_len=6,
                       max_new_tokens=12, eos_token_id=eos)
        s = out.stats
        assert s.decoded_tokens - s.iterations <= s.accepted[0] <= s.decoded_tokens

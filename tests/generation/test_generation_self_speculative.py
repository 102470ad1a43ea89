"""Self-speculative greedy decoding is lossless: the same tokens as plain greedy decoding.

Checked for every decoder family, several exit layers and draft lengths, one prompt and a
left-padded batch of three (ragged per-row acceptance -> holes in the shared cache), plus:
the shared KV cache equals a fresh full recomputation over the final tokens; batched rows ==
rows alone; a trained-style exit head (MultiExitModel, block adapter) drafts losslessly too.
"""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, PAD, VOCAB, full_cache, left_padded, tiny_lm

import exitwise as ew
from exitwise.generation import DecodeSession, GenerationStats, generate, self_speculative_decode
from exitwise.heads.lm import LMHead

NEW = 14
ATOL = 2e-5
CONFIGS = [(1, 1), (1, 4), (2, 3), (3, 2), (3, 5)]  # (exit layer, draft length)


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def lm(request):
    return request.param, tiny_lm(request.param)


def batch(kind: str):
    ids, mask = left_padded()
    return (ids[:1], mask[:1]) if kind == "single" else (ids, mask)


@pytest.mark.parametrize("kind", ["single", "padded3"])
def test_lossless_for_every_exit_and_draft_length(lm, kind):
    _, model = lm
    ids, mask = batch(kind)
    # The reference runs on the stock kernels; the self-speculative runs verify with the
    # few-row streaming linears ("auto", the default) on CPU.
    greedy = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
                      kernels="stock")
    drafted = accepted = 0
    for exit_layer, draft_len in CONFIGS:
        out = generate(
            model, ids, mask, strategy="self_speculative", exit_layer=exit_layer,
            draft_len=draft_len, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
        )
        assert torch.equal(out.sequences, greedy.sequences), (exit_layer, draft_len)
        s = out.stats
        assert s.new_tokens == greedy.stats.new_tokens
        assert all(0 <= a <= d for a, d in zip(s.accepted, s.drafted))
        assert 0.0 <= s.acceptance_rate <= 1.0
        # every emitted token needs all L blocks; rejected drafts only add work
        assert s.layer_applications_per_token >= model.config.num_hidden_layers - 1e-9
        drafted += s.total_drafted
        accepted += s.total_accepted
    assert 0 < accepted < drafted  # the tests saw both acceptances and rejections


@pytest.mark.parametrize("exit_layer, draft_len", [(1, 4), (2, 3)])
def test_shared_cache_equals_full_recomputation(lm, exit_layer, draft_len):
    _, model = lm
    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    b = ids.shape[0]
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0] * b, accepted=[0] * b)
    session = DecodeSession(bb, ids, mask, NEW, {EOS}, PAD, stats, keep_finished=True)
    head = LMHead(bb.hidden_size, bb.vocab_size, backbone=bb).eval()
    self_speculative_decode(session, head, exit_layer, draft_len)
    assert session.cache.get_seq_length(0) == session.mask.shape[1]
    for r in range(b):
        valid = session.mask[r].bool()
        tokens = session.slot_tokens[r][valid]
        ref = full_cache(model, tokens[None])
        for layer in range(bb.num_layers):
            mine = session.cache.layers[layer]
            theirs = ref.layers[layer]
            close = dict(atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(mine.keys[r][:, valid], theirs.keys[0], **close)
            torch.testing.assert_close(mine.values[r][:, valid], theirs.values[0], **close)
        # the row's generated tokens (all but the last, still pending) follow its prompt
        gen = session.generated[r]
        t_real = int(mask[r].sum())
        assert tokens[t_real : t_real + len(gen) - 1].tolist() == gen[:-1]


def test_holes_are_exercised():
    model = tiny_lm("llama")
    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0] * 3, accepted=[0] * 3)
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats, keep_finished=True)
    self_speculative_decode(session, LMHead(32, VOCAB, backbone=bb).eval(), 1, 4)
    assert (session.mask[:, ids.shape[1] :] == 0).any()  # ragged acceptance left holes
    # positions count real tokens only, whatever the holes
    assert session.next_pos.tolist() == session.mask.sum(1).tolist()
    for r in range(3):
        valid = session.mask[r].bool()
        assert session.slot_pos[r][valid].tolist() == list(range(int(valid.sum())))


@pytest.mark.parametrize("strategy", ["greedy", "self_speculative"])
def test_batched_rows_equal_rows_alone(strategy):
    model = tiny_lm("qwen2", seed=3)
    ids, mask = left_padded((6, 2, 4, 5), seed=4)
    opts = dict(strategy=strategy, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
    if strategy == "self_speculative":
        opts.update(exit_layer=2, draft_len=3)
    batched = generate(model, ids, mask, **opts)
    t = ids.shape[1]
    for r in range(ids.shape[0]):
        alone = generate(model, ids[r : r + 1, mask[r].bool()], **opts)
        n = batched.stats.new_tokens[r]
        assert alone.stats.new_tokens == [n]
        assert torch.equal(alone.sequences[0, -n:], batched.sequences[r, t : t + n])
    # right padding: the padding becomes holes, the generated tokens do not change
    right_ids = torch.stack([torch.roll(i, -int((m == 0).sum())) for i, m in zip(ids, mask)])
    right = generate(model, right_ids, mask.flip(1), **opts)
    assert torch.equal(right.sequences[:, t:], batched.sequences[:, t:])


@pytest.mark.parametrize("adapter", ["mlp", "block", "kangaroo"])
def test_exit_heads_of_a_multi_exit_model_draft_losslessly(adapter):
    model = tiny_lm("llama", seed=1)
    config = ew.ExitConfig(
        layers=[1, 2], head="lm", num_labels=VOCAB, head_kwargs={"adapter": adapter},
        final_head_kwargs={},
    )
    multi = ew.attach_exits(model, config).eval()
    with torch.no_grad():  # a "trained" adapter, different from the shared exit
        for p in multi.heads[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
        multi.temperatures.fill_(1.5)
    ids, mask = left_padded()
    greedy = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS)
    for exit_layer in (1, 2):
        out = generate(
            multi, ids, mask, strategy="self_speculative", exit_layer=exit_layer, draft_len=3,
            max_new_tokens=NEW, eos_token_id=EOS, draft_threshold=0.05,
        )
        assert torch.equal(out.sequences, greedy.sequences)
        assert out.stats.total_accepted > 0


def test_confidence_threshold_drafts_less_and_stays_lossless():
    model = tiny_lm("mistral")
    ids, mask = left_padded()
    opts = dict(strategy="self_speculative", exit_layer=2, draft_len=5, max_new_tokens=NEW,
                eos_token_id=EOS)
    free = generate(model, ids, mask, **opts)
    capped = generate(model, ids, mask, draft_threshold=0.9, **opts)
    assert torch.equal(free.sequences, capped.sequences)
    assert capped.stats.total_drafted < free.stats.total_drafted


# -- Kangaroo's second early exit: the draft stops per row --------------------------------------
def _threshold_between(model, ids, mask, exit_layer, draft_len):
    """A draft_threshold that splits the first step's draft confidences of the rows (so rows
    stop at different lengths), from :func:`first_step_drafts`."""
    confs = sorted(c for row in first_step_drafts(model, ids, mask, exit_layer, draft_len)
                   for _, c in row)
    # Halfway across the widest gap between neighbours in the middle half, so no float
    # near-tie decides a stop.
    lo, hi = max(1, len(confs) // 4), max(2, 3 * len(confs) // 4)
    i = max(range(lo, hi), key=lambda n: confs[n] - confs[n - 1])
    return (confs[i - 1] + confs[i]) / 2


@torch.no_grad()
def first_step_drafts(model, ids, mask, exit_layer, draft_len):
    """Per row, by hand from the model's own forward: the first step's draft chain without any
    stop, [(x_j, top-1 probability of x_j)] for j = 1..draft_len. d0 is the greedy first token;
    x_j = argmax of final_norm + lm_head on the exit layer's state of the previous token."""
    bb = ew.wrap_backbone(model)  # the model's own final norm and LM head, as the exit reads
    out = []
    for r in range(ids.shape[0]):
        seq = ids[r, mask[r].bool()].tolist()
        first = model(input_ids=torch.tensor([seq])).logits[0, -1].argmax().item()
        seq.append(first)
        chain = []
        for _ in range(draft_len):
            hs = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
            logits = bb.lm_logits(bb.final_norm(hs[exit_layer][0, -1]))
            probs = torch.softmax(logits.float(), -1)
            x = int(probs.argmax())
            chain.append((x, float(probs.max())))
            seq.append(x)
        out.append(chain)
    return out


class _OneStep(DecodeSession):
    """A session that stops after its first self-speculative step."""

    steps = 0

    @property
    def unfinished(self):
        self.steps += 1
        return self.steps == 1


@pytest.mark.parametrize("kind", ["single", "padded3"])
def test_per_row_draft_threshold_is_lossless(lm, kind):
    _, model = lm
    ids, mask = batch(kind)
    greedy = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
                      kernels="stock")
    for exit_layer, draft_len in [(1, 4), (2, 3)]:
        threshold = _threshold_between(model, ids, mask, exit_layer, draft_len)
        out = generate(model, ids, mask, strategy="self_speculative", exit_layer=exit_layer,
                       draft_len=draft_len, max_new_tokens=NEW, eos_token_id=EOS,
                       pad_token_id=PAD, draft_threshold=threshold)
        assert torch.equal(out.sequences, greedy.sequences), (exit_layer, draft_len)
        assert all(0 <= a <= d for a, d in zip(out.stats.accepted, out.stats.drafted))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_row_stops_at_its_own_unsure_draft(family):
    """First step, padded batch of 3: row r drafts k_r = the first j whose draft x_j has top-1
    probability below the threshold (x_j itself kept), else draft_len; computed by hand."""
    model = tiny_lm(family)
    ids, mask = left_padded()
    exit_layer, draft_len = 1, 4
    chains = first_step_drafts(model, ids, mask, exit_layer, draft_len)
    threshold = _threshold_between(model, ids, mask, exit_layer, draft_len)
    want = []
    for chain in chains:
        unsure = [j + 1 for j, (_, c) in enumerate(chain) if c < threshold]
        want.append(min(unsure[0], draft_len) if unsure else draft_len)
    assert len(set(want)) > 1  # the rows do stop at different lengths
    bb = ew.wrap_backbone(model)
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0] * 3, accepted=[0] * 3)
    session = _OneStep(bb, ids, mask, NEW, set(), PAD, stats)
    head = LMHead(bb.hidden_size, bb.vocab_size, backbone=bb).eval()
    self_speculative_decode(session, head, exit_layer, draft_len, draft_threshold=threshold)
    assert stats.drafted == want
    # each row accepted at most its own drafts, and the drafts it kept are the chain's
    for r, chain in enumerate(chains):
        n = stats.accepted[r]
        assert n <= want[r]
        assert session.generated[r][1 : 1 + n] == [x for x, _ in chain[:n]]


def test_per_row_stop_makes_batched_rows_draft_as_alone():
    """With per-row stops a row drafts (and accepts) exactly what it does decoded alone."""
    model = tiny_lm("qwen2", seed=3)
    ids, mask = left_padded((6, 2, 4, 5), seed=4)
    opts = dict(strategy="self_speculative", exit_layer=2, draft_len=4, max_new_tokens=NEW,
                eos_token_id=None, pad_token_id=PAD)
    threshold = _threshold_between(model, ids, mask, 2, 4)
    batched = generate(model, ids, mask, draft_threshold=threshold, **opts)
    assert len(set(batched.stats.drafted)) > 1
    for r in range(ids.shape[0]):
        alone = generate(model, ids[r : r + 1, mask[r].bool()], draft_threshold=threshold, **opts)
        assert alone.stats.drafted == [batched.stats.drafted[r]]
        assert alone.stats.accepted == [batched.stats.accepted[r]]


def test_kangaroo_adapter_cache_equals_full_recomputation():
    """The adapter's own keys/values (cache layer L) after a ragged batched run with per-row
    stops equal those of the adapter run over the final tokens' layer-E states at once."""
    from exitwise.backbones.hf_decoder import DecodeContext, prompt_positions

    model = tiny_lm("llama", seed=1)
    config = ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                           head_kwargs={"adapter": "kangaroo"}, final_head_kwargs={})
    multi = ew.attach_exits(model, config).eval()
    with torch.no_grad():
        for p in multi.heads[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    bb, head = multi.backbone, multi.heads[0]
    ids, mask = left_padded()
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0] * 3, accepted=[0] * 3)
    session = DecodeSession(bb, ids, mask, NEW, set(), PAD, stats, keep_finished=True)
    threshold = _threshold_between(model, ids, mask, 2, 4)
    self_speculative_decode(session, head, 2, 4, draft_threshold=threshold)
    assert (session.mask[:, ids.shape[1]:] == 0).any()  # holes: ragged acceptance
    mine = session.cache.layers[bb.num_layers]
    for r in range(3):
        valid = session.mask[r].bool()
        tokens = session.slot_tokens[r][valid][None]
        real = torch.ones_like(tokens)
        with torch.no_grad():
            state = bb.start(input_ids=tokens, attention_mask=real)
            for i in range(2):
                state = bb.step(i, state)
            from transformers import DynamicCache

            cache = DynamicCache()
            for layer in range(bb.num_layers):  # fill layers 0..L-1 so layer L is next
                cache.update(torch.zeros(1, bb.num_kv_heads, 0, bb.head_dim),
                             torch.zeros(1, bb.num_kv_heads, 0, bb.head_dim), layer)
            ctx = DecodeContext(cache, prompt_positions(real), real)
            head.token_logits(state.hidden, ctx)
        theirs = cache.layers[bb.num_layers]
        torch.testing.assert_close(mine.keys[r][:, valid], theirs.keys[0], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(mine.values[r][:, valid], theirs.values[0], atol=ATOL,
                                   rtol=1e-4)


def test_lead_by_hand():
    from exitwise.generation.self_speculative import _lead

    budget = torch.tensor([5, 2, 7, 0])
    live = torch.tensor([True, True, True, False])
    assert _lead(budget, live).tolist() == [2, 5, 0, 0]  # the most-behind row has 7 left


@pytest.mark.parametrize("balanced", [True, False])
def test_automatic_lengths_keep_the_rows_of_a_batch_together(balanced):
    """With a controller (draft_len="auto") at batch > 1, a row ahead of the most-behind
    row by l tokens drafts l fewer, so no row gets more than k tokens ahead (k: the step's
    draft length); without one, rows drift apart. Both lossless."""
    from exitwise.generation.draft_control import DraftLengthController

    class Always4(DraftLengthController):  # drafts 4 at every step, never rests
        def choose(self, rows, source="exit", passes="per_token"):
            return 4

        def resting(self, rows, sources):
            return False

    model = tiny_lm("llama")
    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    new = 40
    ref = generate(model, ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=PAD)
    stats = GenerationStats("self_speculative", bb.num_layers, drafted=[0] * 3, accepted=[0] * 3)
    session = DecodeSession(bb, ids, mask, new, set(), PAD, stats)
    spread = []
    emit = session.emit

    def watched(tokens):
        emit(tokens)
        done = [len(session.generated[r]) for r in range(3)]
        spread.append(max(done) - min(done))

    session.emit = watched
    out = self_speculative_decode(session, LMHead(32, VOCAB, backbone=bb).eval(), 1, 4,
                                  controller=Always4() if balanced else None)
    assert torch.equal(out, ref.sequences)
    if balanced:
        assert max(spread) <= 4
    else:  # the same drafts unbalanced: some row ran further ahead (the check can fail)
        assert max(spread) > 4

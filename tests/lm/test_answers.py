"""The ``answers`` objective: exits trained on the model's own greedy answers, from cached
features (tiny random LMs)."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import VOCAB, tiny_lm  # noqa: E402

import exitwise as ew  # noqa: E402
from exitwise.errors import DataError  # noqa: E402
from exitwise.lm import AnswersConfig, generate_answers, loop  # noqa: E402
from exitwise.lm.answers import answer_token_ranking  # noqa: E402
from exitwise.lm.objectives.answers import answer_ce, answer_targets, exit_features  # noqa: E402


def tune_on_answers(model, answers, *, output_dir=None, progress=False, **options):
    return ew.tune_exits(model, answers, AnswersConfig(**options), output_dir=output_dir,
                         progress=progress)


def answer_model(family="llama", adapter="mlp", layers=(1,), draft_vocab=None, seed=0):
    lm = tiny_lm(family, seed=seed, damp=1.0)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(20.0)  # peaked: greedy answers are meaningful
    kwargs = {"adapter": adapter, **({"draft_vocab": draft_vocab} if draft_vocab else {})}
    config = ew.ExitConfig(layers=list(layers), head="lm", num_labels=VOCAB,
                           head_kwargs=kwargs, final_head_kwargs={})
    return ew.attach_exits(lm, config)


def prompts(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def test_generate_answers_are_the_greedy_continuations():
    model = answer_model()
    ps = prompts(5)
    answers = generate_answers(model, ps, max_new_tokens=6, batch_size=2, progress=False)
    for (p, a), prompt in zip(answers, ps):
        assert p == prompt and 1 <= len(a) <= 6
        out = ew.generate(model, torch.tensor([p]), max_new_tokens=6)
        assert out.sequences[0, len(p):len(p) + len(a)].tolist() == a


def test_cached_features_equal_the_backbone_hidden_states():
    model = answer_model(layers=(1, 3))
    answers = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15])]
    feats = exit_features(model, [0, 1], answers, batch_size=2, progress=False)
    for j, depth in enumerate((1, 3)):
        for i, (p, a) in enumerate(answers):
            ids = torch.tensor([p + a])
            state = model.backbone.start(input_ids=ids, attention_mask=torch.ones_like(ids))
            for layer in range(depth):
                state = model.backbone.step(layer, state)
            torch.testing.assert_close(feats[j][i], state.hidden[0])


@pytest.mark.parametrize("family,adapter", [("llama", "mlp"), ("gpt2", "block")])
def test_tuning_raises_held_out_agreement_and_keeps_the_backbone(tmp_path, family, adapter):
    model = answer_model(family, adapter, draft_vocab=60)
    before_bb = {n: t.clone() for n, t in model.backbone.model.state_dict().items()}
    # A random tiny LM's answers are a random function of the prompt: the exit needs a few
    # hundred of them to generalise to new prompts.
    answers = generate_answers(model, prompts(200), max_new_tokens=12, progress=False)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (16, 6), generator=g)  # new prompts

    def speculate():
        return ew.generate(model, ids, strategy="self_speculative", exit_layer=1, draft_len=1,
                           max_new_tokens=12)

    accepted_before = speculate().stats.acceptance_rate
    result = tune_on_answers(model, answers, epochs=10, lr=3e-3, batch_size=16,
                                   eval_fraction=0.2, output_dir=tmp_path, progress=False)
    assert result.after[1] > result.before[1] + 0.05
    assert result.loss_history[-1] < result.loss_history[0]
    for n, t in model.backbone.model.state_dict().items():
        assert torch.equal(t, before_bb[n]), n
    # The draft vocabulary holds the most frequent answer tokens.
    ranked = answer_token_ranking(answers[: int(0.8 * len(answers))], VOCAB)
    assert set(model.heads[0].vocab_ids.tolist()) <= set(range(VOCAB))
    top = ranked[:5].tolist()
    assert len(set(top) & set(model.heads[0].vocab_ids.tolist())) == 5
    # What the held-out agreement stands for: more drafts accepted on new prompts, and
    # decoding still lossless.
    spec = speculate()
    assert spec.stats.acceptance_rate > accepted_before + 0.1
    assert torch.equal(spec.sequences, ew.generate(model, ids, max_new_tokens=12).sequences)


def test_answer_loss_by_hand():
    """Targets: the answer's next token from the last prompt position on, -100 on the prompt,
    padding and ids outside a draft vocabulary; the loss is their mean cross-entropy."""
    import math

    answers = [([5, 6], [7, 8]), ([9], [4])]
    tgt = answer_targets(answers, [0, 1], width=4)
    assert tgt.tolist() == [[-100, 7, 8, -100], [4, -100, -100, -100]]
    where = torch.full((VOCAB,), -100, dtype=torch.long)
    where[8], where[4] = 0, 1  # a draft vocabulary of ids (8, 4)
    assert answer_targets(answers, [0, 1], 4, where).tolist() == [
        [-100, -100, 0, -100], [1, -100, -100, -100]]
    logits = torch.zeros(2, 4, 2)
    logits[0, 2] = torch.tensor([2.0, 0.0])
    logits[1, 0] = torch.tensor([0.0, 1.0])
    want = (-(2.0 - math.log(math.exp(2.0) + 1.0)) - (1.0 - math.log(1.0 + math.exp(1.0)))) / 2
    got = answer_ce(logits, answer_targets(answers, [0, 1], 4, where))
    assert float(got) == pytest.approx(want)
    assert float(answer_ce(logits, torch.full((2, 4), -100))) == 0.0


def test_an_interrupted_run_resumes_to_the_same_heads(tmp_path, monkeypatch):
    answers = generate_answers(answer_model(), prompts(24), max_new_tokens=8, progress=False)
    opts = dict(epochs=4, batch_size=8, save_every=3)
    full = answer_model()
    r0 = tune_on_answers(full, answers, **opts)
    real, saves = loop.save_checkpoint, []

    def save_then_stop(*args, **kwargs):  # the process dies right after the first checkpoint
        real(*args, **kwargs)
        saves.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tune_on_answers(answer_model(), answers, output_dir=tmp_path, **opts)
    monkeypatch.undo()
    resumed = answer_model()  # fresh heads: everything comes from the checkpoint
    r2 = tune_on_answers(resumed, answers, output_dir=tmp_path, **opts)
    assert saves == [1] and r2.start_step == 3 and r2.steps == r0.steps
    assert r2.loss_history == r0.loss_history and r2.after == r0.after
    for (n, a), (_, b) in zip(full.heads[0].state_dict().items(),
                              resumed.heads[0].state_dict().items()):
        assert torch.equal(a, b), n


def test_bad_answers_are_refused():
    model = answer_model()
    with pytest.raises(DataError, match="no answers"):
        tune_on_answers(model, [])
    with pytest.raises(DataError, match="empty"):
        tune_on_answers(model, [([3, 4], [])])
    with pytest.raises(DataError, match="outside"):
        tune_on_answers(model, [([3, 4], [VOCAB + 5])])


def test_answer_cache_is_reused_extended_and_keyed(tmp_path):
    import json

    model = answer_model()
    ps = prompts(7)
    cache = tmp_path / "answers.json"
    first = generate_answers(model, ps[:4], max_new_tokens=5, batch_size=3, cache=cache,
                             progress=False)
    data = json.loads(cache.read_text())
    assert [list(x) for x in data["items"]] == [[p, a] for p, a in first]
    data["items"][0][1] = [7, 7, 7]  # marks the cached answer: reuse returns it unchanged
    cache.write_text(json.dumps(data))
    more = generate_answers(model, ps, max_new_tokens=5, batch_size=3, cache=cache,
                            progress=False)
    assert more[0] == (ps[0], [7, 7, 7]) and more[1:4] == first[1:]
    fresh = generate_answers(model, ps, max_new_tokens=5, progress=False)
    assert more[4:] == fresh[4:]
    other = generate_answers(model, ps[:2], max_new_tokens=4, cache=cache, progress=False)
    assert other[0] != (ps[0], [7, 7, 7])  # another budget: the cache does not apply


def test_answer_cache_is_keyed_by_the_weights_and_plain_models_are_accepted(tmp_path):
    # another model of the same architecture (other weights) must not get the first one's
    # answers back; a plain Hugging Face causal LM answers as its wrapped backbone does
    import json

    ps = prompts(4)
    cache = tmp_path / "answers.json"
    a = answer_model(seed=0)
    generate_answers(a, ps, max_new_tokens=5, cache=cache, progress=False)
    data = json.loads(cache.read_text())
    data["items"][0][1] = [7, 7, 7]
    cache.write_text(json.dumps(data))
    b = answer_model(seed=1)
    got = generate_answers(b, ps, max_new_tokens=5, cache=cache, progress=False)
    assert got == generate_answers(b, ps, max_new_tokens=5, progress=False)
    assert got[0] != (ps[0], [7, 7, 7])
    plain = generate_answers(b.backbone.model, ps, max_new_tokens=5, progress=False)
    assert plain == got
    # a cache written before keys held the weights' checksum still matches on the rest
    data = json.loads(cache.read_text())
    data["key"].pop("weights")
    data["items"][0][1] = [7, 7, 7]
    cache.write_text(json.dumps(data))
    assert generate_answers(b, ps, max_new_tokens=5, cache=cache, progress=False)[0] == (
        ps[0], [7, 7, 7])


def test_agreement_on_answers_equals_an_independent_count():
    """Agreement = the share of answer tokens (never prompt tokens) that the exit's argmax at
    the previous position equals, counted here from the model's own hidden states."""
    model = answer_model(layers=(1,)).eval()
    answers = generate_answers(model, prompts(6, seed=2), max_new_tokens=5, progress=False)
    hits = total = 0
    for p, a in answers:
        ids = torch.tensor([p + a])
        with torch.no_grad():
            hidden = model.backbone.model(input_ids=ids, output_hidden_states=True
                                          ).hidden_states[1]
            drafts = model.heads[0].token_logits(hidden)[0].argmax(-1)
        for t, token in enumerate(a):
            hits += int(drafts[len(p) - 1 + t]) == token
            total += 1
    got = ew.lm.agreement_on_answers(model, answers, batch_size=4, progress=False)
    assert got == {1: pytest.approx(hits / total)} and 0 < hits < total

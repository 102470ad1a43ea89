"""Feature-conditioned draft exits (``LMHead(conditioned=True)``): the condition is the full
model's final state at the previous position -- in training (``previous_final``) and in
self-speculative decoding (checked against a full forward) -- the head starts as an
unconditioned one, drafts losslessly, and tunes on answers."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import EOS, PAD, VOCAB, left_padded, tiny_lm

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.lm import AnswersConfig, generate_answers
from exitwise.lm.objectives.answers import previous_final
from exitwise.recipes.lm import TuneLMJob, run_tune_lm


def conditioned_model(family: str = "llama", layer: int = 1, seed: int = 0, scale: float = 0.3):
    lm = tiny_lm(family, seed=seed)
    config = ew.ExitConfig(layers=[layer], head="lm", num_labels=VOCAB,
                           head_kwargs={"adapter": "mlp", "conditioned": True},
                           final_head_kwargs={})
    model = ew.attach_exits(lm, config).eval()
    with torch.no_grad():  # a "trained" fuse: the condition changes the drafts
        g = torch.Generator().manual_seed(seed)
        fuse = model.heads[0].fuse
        fuse.weight.copy_(torch.randn(fuse.weight.shape, generator=g) * scale)
    return lm, model


def test_previous_final_by_hand():
    final = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    cond = previous_final(final)
    assert cond[0, 0].tolist() == [0.0] * 4
    assert torch.equal(cond[0, 1:], final[0, :2])
    g = torch.Generator().manual_seed(0)
    dropped = previous_final(final.repeat(50, 1, 1), 0.5, g)
    keep = torch.rand((50, 3), generator=torch.Generator().manual_seed(0)) >= 0.5
    expected = previous_final(final.repeat(50, 1, 1)) * keep[..., None]
    assert torch.equal(dropped, expected)
    assert 0.3 < keep.float().mean() < 0.7


def test_conditioned_head_starts_as_unconditioned():
    lm = tiny_lm("llama")
    config = ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                           head_kwargs={"adapter": "mlp", "conditioned": True},
                           final_head_kwargs={})
    head = ew.attach_exits(lm, config).heads[0].eval()
    h, c = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(head.compact_logits(h, None, c), head.compact_logits(h))
    with pytest.raises(ConfigError, match="conditioned"):
        ew.attach_exits(tiny_lm("llama"), ew.ExitConfig(
            layers=[2], head="lm", num_labels=VOCAB, final_head_kwargs={},
            head_kwargs={"adapter": "block", "conditioned": True}))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_condition_is_the_dropped_condition_of_training(family):
    """Training zeroes a dropped condition; decoding passes none for later drafts. Both must
    be the same function: h + fuse(final_norm(0)), i.e. the fuse's bias (+ fuse(beta) for a
    LayerNorm with bias beta, as GPT-2's)."""
    _, model = conditioned_model(family)
    head = model.heads[0]
    with torch.no_grad():
        head.fuse.bias.copy_(torch.linspace(-1.0, 1.0, head.fuse.bias.numel()))
    bb = model.backbone
    h = torch.randn(2, 3, 32)
    none = head.compact_logits(h)
    zero = head.compact_logits(h, None, torch.zeros(2, 3, 32))
    torch.testing.assert_close(none, zero)
    shift = head.fuse(bb.final_norm(torch.zeros(32)))  # by hand: what a zero state adds
    manual = bb.lm_logits(bb.final_norm(head.mlp(h + shift)))
    torch.testing.assert_close(none, manual)
    assert not torch.allclose(none, bb.lm_logits(bb.final_norm(head.mlp(h))))


@torch.no_grad()
def test_drafting_keeps_the_absent_shift_until_the_weights_change():
    """Without grad (drafting) fuse(final_norm(0)) is computed once per weight version: the
    same logits as computed afresh, and a changed fuse is picked up."""
    _, model = conditioned_model()
    head, bb = model.heads[0], model.backbone
    h = torch.randn(1, 1, 32)

    def by_hand():
        return bb.lm_logits(bb.final_norm(head.mlp(h + head.fuse(bb.final_norm(torch.zeros(32))))))

    head.fuse.bias.fill_(0.5)
    torch.testing.assert_close(head.compact_logits(h), by_hand())
    first = head._absent_cache[1]
    head.compact_logits(h)
    assert head._absent_cache[1] is first  # reused, not recomputed
    head.fuse.bias.fill_(-0.5)  # an in-place update (as an optimizer step) is seen
    torch.testing.assert_close(head.compact_logits(h), by_hand())
    assert head._absent_cache[1] is not first


def test_decoding_feeds_the_final_state_of_the_previous_position():
    lm, model = conditioned_model()
    head = model.heads[0]
    seen: list[torch.Tensor] = []
    hook = head.fuse.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    prompt = torch.tensor([[5, 17, 42, 8, 23]])
    try:
        out = ew.generate(model, prompt, strategy="self_speculative", exit_layer=1,
                          draft_len=1, max_new_tokens=12, eos_token_id=[])
    finally:
        hook.remove()
    seq = out.sequences
    # the final norm of the last block's output at every position of the final sequence
    bb = model.backbone
    with torch.no_grad():
        state = bb.start(input_ids=seq, attention_mask=torch.ones_like(seq))
        for i in range(bb.num_layers):
            state = bb.step(i, state)
        expected = bb.final_norm(state.hidden[0])  # (T, H)
    # one conditioned first draft per step that drafted (the last may have no budget left)
    assert len(seen) == sum(1 for k in out.stats.step_draft_lengths if k) >= 5
    t = prompt.shape[1]
    positions = []
    for got in seen:
        dist = (expected - got[0, 0]).abs().amax(-1)
        pos = int(dist.argmin())
        assert float(dist[pos]) < 1e-4
        positions.append(pos)
    # the prompt's last token chose the first answer token; then strictly later positions,
    # each the one that chose the step's pending token
    assert positions[0] == t - 1
    assert all(b > a for a, b in zip(positions, positions[1:]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_conditioned_drafts_are_lossless(family):
    lm, model = conditioned_model(family, layer=2)
    ids, mask = left_padded()
    ref = ew.generate(lm, ids, mask, max_new_tokens=14, eos_token_id=EOS, pad_token_id=PAD,
                      kernels="stock")
    for draft_len in (1, 3, "auto"):
        out = ew.generate(model, ids, mask, strategy="self_speculative", exit_layer=2,
                          draft_len=draft_len, max_new_tokens=14, eos_token_id=EOS,
                          pad_token_id=PAD, ngram=3 if draft_len == "auto" else None)
        assert torch.equal(out.sequences, ref.sequences), draft_len
    # sampling through a conditioned exit runs and keeps every row's budget
    s = ew.generate(model, ids, mask, strategy="self_speculative", exit_layer=2, draft_len=2,
                    max_new_tokens=8, eos_token_id=[], do_sample=True, seed=0)
    assert s.stats.new_tokens == [8, 8, 8]


def test_tuning_trains_the_fuse_and_saves_it(tmp_path):
    _, model = conditioned_model(scale=0.0)
    head = model.heads[0]
    assert not bool(head.fuse.weight.detach().any())
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(3, VOCAB, (5,), generator=g).tolist() for _ in range(24)]
    answers = generate_answers(model, ps, max_new_tokens=8, progress=False)
    result = ew.tune_exits(model, answers, AnswersConfig(epochs=2, lr=3e-3, batch_size=8,
                                                         eval_fraction=0.25),
                           output_dir=tmp_path / "run", progress=False)
    assert bool(head.fuse.weight.detach().any())  # the condition got gradient
    assert 0.0 <= result.after[1] <= 1.0
    model.save_pretrained(tmp_path / "saved")
    again = ew.MultiExitModel.from_pretrained(tmp_path / "saved", backbone=tiny_lm("llama"))
    assert again.heads[0].conditioned
    torch.testing.assert_close(again.heads[0].fuse.weight, head.fuse.weight)
    # the finished run is not continued with another condition dropout (it was, silently)
    _, other = conditioned_model(scale=0.0)
    with pytest.raises(ew.CheckpointError, match="condition_dropout"):
        ew.tune_exits(other, answers, AnswersConfig(epochs=2, lr=3e-3, batch_size=8,
                                                    eval_fraction=0.25, condition_dropout=0.9),
                      output_dir=tmp_path / "run", progress=False)


def test_conditioned_needs_the_answers_objective(tmp_path):
    with pytest.raises(ConfigError, match="answers"):
        run_tune_lm(TuneLMJob(out_dir=str(tmp_path), conditioned=True, objective="kl"),
                    print_fn=lambda *a: None)
    with pytest.raises(ConfigError, match="condition_dropout"):
        AnswersConfig(condition_dropout=1.0).validate()

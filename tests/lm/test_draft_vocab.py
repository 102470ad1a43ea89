"""Draft vocabularies of ``lm`` exit heads (``draft_vocab=K``): choice, tuning, saving, and
lossless self-speculative decoding with a restricted draft."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import EOS, VOCAB, tiny_lm  # noqa: E402

import exitwise as ew  # noqa: E402
from exitwise.errors import ConfigError  # noqa: E402
from exitwise.lm import ExitKLConfig  # noqa: E402
from exitwise.lm.data import pad_batch  # noqa: E402
from exitwise.lm.draft_vocab import choose_draft_vocab, expected_token_mass  # noqa: E402
from exitwise.lm.exits import exit_and_final_logits  # noqa: E402

K = 48


def model_with_subset(family: str = "llama", adapter: str = "mlp", size: int | None = K):
    lm = tiny_lm(family, seed=0, damp=1.0)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(20.0)
    kwargs = {"adapter": adapter, **({"draft_vocab": size} if size else {})}
    config = ew.ExitConfig(layers=[1, 2], head="lm", head_kwargs=kwargs, final_head_kwargs={})
    return ew.attach_exits(lm, config)


def skewed_texts(n: int = 40, length: int = 20, seed: int = 0, vocab: int = 30) -> list[list[int]]:
    """Token ids drawn from [3, vocab)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def test_num_labels_defaults_to_the_vocabulary_for_lm_exits():
    model = model_with_subset(size=None)
    assert model.num_labels == VOCAB and model.config.num_labels == VOCAB


def test_expected_mass_ranks_the_models_likely_tokens_first():
    model = model_with_subset().eval()
    seqs = skewed_texts()
    mass = expected_token_mass(model, seqs, pad_id=0)
    n_positions = sum(len(s) for s in seqs)
    assert mass.shape == (VOCAB,)
    assert mass.sum().item() == pytest.approx(n_positions, rel=1e-6)  # one distribution per position
    ids = choose_draft_vocab(model, seqs, K, pad_id=0)
    assert ids.shape == (K,) and ids.unique().numel() == K
    # every token the final layer picks most often is in the subset
    _, final = exit_and_final_logits(model, [], *pad_batch(seqs, 0), grad=False)
    top = torch.bincount(final.argmax(-1).flatten(), minlength=VOCAB)
    assert set(top.argsort(descending=True)[:5].tolist()) <= set(ids.tolist())


def test_restricted_head_logits_are_minus_inf_outside_and_match_the_full_head_inside():
    model = model_with_subset().eval()
    head = model.heads[0]
    ids = torch.arange(50, 50 + K)
    head.set_draft_vocab(ids)
    hidden = torch.randn(2, 3, 32)
    full_model = model_with_subset(size=None).eval()
    full_model.heads[0].load_state_dict(
        {k: v for k, v in head.state_dict().items() if k != "vocab_ids"}
    )
    ref = full_model.heads[0].token_logits(hidden)
    out = head.token_logits(hidden)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.isinf(out[..., outside]).all() and (out[..., outside] < 0).all()
    torch.testing.assert_close(out[..., ids], ref[..., ids])
    compact = head.compact_logits(hidden)
    assert compact.shape == (2, 3, K)
    assert torch.equal(head.compact_argmax(compact), out.argmax(-1))


def test_tuning_sets_the_subset_raises_agreement_and_saves_it(tmp_path):
    model = model_with_subset("gpt2")
    model.train()
    config = ExitKLConfig(steps=100, lr=3e-3, batch_size=8, seq_len=24, eval_fraction=0.25)
    # distillation raises agreement
    result = ew.tune_exits(model, skewed_texts(48, 24, vocab=VOCAB), config, progress=False)
    for d in (1, 2):
        assert result.after[d] > result.before[d] + 0.05, result.table()
    ids = model.heads[0].vocab_ids.clone()
    assert not torch.equal(ids, torch.arange(K))  # chosen from data, not the placeholder
    model.save_pretrained(tmp_path / "m")
    lm = tiny_lm("gpt2", seed=0, damp=1.0)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(20.0)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path / "m", lm)
    assert torch.equal(loaded.heads[0].vocab_ids, ids)
    for (n, a), (_, b) in zip(model.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_self_speculative_with_a_restricted_draft_is_lossless(family):
    model = model_with_subset(family).eval()
    model.heads[0].set_draft_vocab(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:K])
    lm = model.backbone.model
    ids = torch.tensor([[0, 0, 5, 9, 14], [4, 8, 15, 16, 23]])
    mask = (ids != 0).long()
    mask[1, 0] = 1
    greedy = ew.generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=EOS)
    spec = ew.generate(
        model, ids, attention_mask=mask, strategy="self_speculative", exit_layer=1, draft_len=3,
        max_new_tokens=12, eos_token_id=EOS,
    )
    assert torch.equal(spec.sequences, greedy.sequences)
    assert lm is model.backbone.model


def test_bad_draft_vocab_is_refused():
    with pytest.raises(ConfigError, match="draft_vocab"):
        model_with_subset(size=-1)
    model = model_with_subset()
    with pytest.raises(ConfigError, match="distinct"):
        model.heads[0].set_draft_vocab([3] * K)
    with pytest.raises(ConfigError, match="ids must be in"):
        model.heads[0].set_draft_vocab(torch.arange(VOCAB - K + 1, VOCAB + 1))


def test_calm_early_exit_decoding_reads_the_restricted_head():
    """CALM policies see the K finite logits of a restricted exit; tokens emitted at that exit
    lie in its draft vocabulary; a never-exit threshold still equals greedy."""
    model = model_with_subset("llama").eval()
    subset = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2))[:K]
    for k in (0, 1):
        model.heads[k].set_draft_vocab(subset)
    ids = torch.tensor([[5, 9, 14, 3], [4, 8, 15, 16]])
    mask = torch.ones_like(ids)
    greedy = ew.generate(model, ids, attention_mask=mask, max_new_tokens=8, eos_token_id=EOS)
    common = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=EOS,
                  strategy="early_exit", kv="skip")
    never = ew.generate(model, ids, policy=ew.get_policy("calm_softmax", threshold=1.0, tau=0.0),
                        **common)
    assert torch.equal(never.sequences, greedy.sequences)
    # top-1 > 0.1 always holds over K ids here (the top-1 minus top-2 gap need not)
    always = ew.generate(model, ids, policy=ew.get_policy("calm_maxprob", threshold=0.0, tau=0.0),
                         **common)
    new = always.sequences[:, ids.shape[1] + 1 :]  # the first token comes from the prefill
    assert set(new.flatten().tolist()) <= set(subset.tolist())

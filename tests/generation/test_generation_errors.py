"""Bad requests to ``exitwise.generation.generate`` fail with clear exitwise errors."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import PAD, VOCAB, left_padded, tiny_lm

import exitwise as ew
from exitwise.errors import ConfigError, InputError, UnsupportedModelError
from exitwise.generation import generate


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


@pytest.mark.parametrize("exit_layer", [0, 4, 5, -1, 1.5])
def test_exit_layer_out_of_range(llama, exit_layer):
    ids, mask = left_padded()
    with pytest.raises(ConfigError, match=r"exit_layer must be a depth in 1\.\.3"):
        generate(llama, ids, mask, strategy="self_speculative", exit_layer=exit_layer)


def test_exit_layer_required_without_a_tuned_or_shipped_drafter(llama):
    ids, mask = left_padded()
    with pytest.raises(ConfigError, match="exit_layer is required.*no drafter is shipped"):
        generate(llama, ids, mask, strategy="self_speculative")


@pytest.mark.parametrize("max_new_tokens", [0, -3, 2.0])
def test_max_new_tokens_must_be_positive(llama, max_new_tokens):
    ids, mask = left_padded()
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(llama, ids, mask, max_new_tokens=max_new_tokens)


def test_bad_options(llama):
    ids, mask = left_padded()
    with pytest.raises(ConfigError, match="strategy"):
        generate(llama, ids, mask, strategy="beam")
    with pytest.raises(ConfigError, match="draft_len"):
        generate(llama, ids, mask, strategy="self_speculative", exit_layer=2, draft_len=0)
    with pytest.raises(ConfigError, match="draft_threshold"):
        generate(llama, ids, mask, strategy="self_speculative", exit_layer=2, draft_threshold=2)
    with pytest.raises(ConfigError, match="layer_skip and swift"):  # not a raw ValueError
        generate(llama, ids, mask, strategy="self_speculative", exit_layer=2,
                 draft_threshold="auto")
    with pytest.raises(ConfigError, match="kernels"):
        generate(llama, ids, mask, kernels="fast")
    # options that would do nothing in the combination given (they were taken silently)
    with pytest.raises(ConfigError, match="give ngram"):
        generate(llama, ids, mask, strategy="self_speculative", exit_layer=2, ngram_len=1)
    for strategy, opts in (("self_speculative", {"exit_layer": 2}), ("anpd", {}),
                           ("layer_skip", {"skip": [1]})):
        with pytest.raises(ConfigError, match="max_draft_len bounds draft_len='auto'"):
            generate(llama, ids, mask, strategy=strategy, draft_len=6, max_draft_len=2, **opts)
    capped = generate(llama, ids, mask, strategy="self_speculative", exit_layer=2,
                      draft_len="auto", max_draft_len=2, max_new_tokens=6)
    assert max(capped.stats.step_draft_lengths) <= 2


def test_empty_or_malformed_prompts(llama):
    with pytest.raises(InputError, match="empty"):
        generate(llama, torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(InputError, match="empty"):
        generate(llama, torch.zeros(0, 4, dtype=torch.long))
    ids, mask = left_padded()
    mask[1] = 0
    with pytest.raises(InputError, match="all zeros"):
        generate(llama, ids, mask)
    with pytest.raises(InputError, match="shape"):
        generate(llama, ids, mask[:, :2])
    with pytest.raises(InputError, match=r"\[0, 100\)"):
        generate(llama, torch.tensor([[5, VOCAB]]))
    with pytest.raises(InputError, match="integer"):
        generate(llama, torch.rand(1, 3))
    # other mask values shifted the positions (counted along the mask) and changed the text
    ids, mask = left_padded()
    for bad in (mask * 2, mask * 2 - 1):
        with pytest.raises(InputError, match=r"1 \(a token\) and 0 \(padding\)"):
            generate(llama, ids, bad)
    ref = generate(llama, ids, mask, max_new_tokens=3)
    assert torch.equal(generate(llama, ids, mask.bool(), max_new_tokens=3).sequences,
                       ref.sequences)


def test_a_1d_prompt_is_one_row(llama):
    out = generate(llama, torch.tensor([5, 6, 7]), max_new_tokens=3, eos_token_id=[])
    assert out.sequences.shape == (1, 6)


def test_unsupported_architectures():
    import transformers as tf
    from conftest import tiny_encoder

    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        generate(tiny_encoder("bert"), torch.tensor([[5, 6]]))
    opt = tf.OPTForCausalLM(
        tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
            num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
        )
    )
    with pytest.raises(UnsupportedModelError, match="llama"):
        generate(opt, torch.tensor([[5, 6]]))


def test_multi_exit_model_needs_an_lm_exit_there(llama):
    multi = ew.attach_exits(llama, ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB))
    ids, mask = left_padded()
    with pytest.raises(ConfigError, match=r"no exit at layer 1; its exits: \[2, 4\]"):
        generate(multi, ids, mask, strategy="self_speculative", exit_layer=1)


def test_learned_positions_must_fit(llama):
    gpt2 = tiny_lm("gpt2")  # 64 positions
    with pytest.raises(InputError, match="64 positions"):
        generate(gpt2, torch.tensor([[5] * 10]), max_new_tokens=56)
    # the last new token is emitted, never fed: 10 + 55 - 1 = 64 positions suffice, as in
    # HF's generate (refused before), for speculative decoding too (its drafts past the
    # budget are never emitted)
    ids = torch.tensor([[5] * 10])
    ref = gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=55, min_new_tokens=55, pad_token_id=PAD)
    for opts in ({}, {"strategy": "self_speculative", "exit_layer": 2, "draft_len": 3}):
        out = generate(gpt2, ids, max_new_tokens=55, eos_token_id=[], **opts)
        assert torch.equal(out.sequences, ref)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(llama):
    class Tok:  # a tokenizer of another model: more tokens than this model's vocabulary
        def __len__(self) -> int:
            return VOCAB + 50

    with pytest.raises(ConfigError, match="tokenizer and model do not match"):
        generate(llama, torch.tensor([[5, 6]]), tokenizer=Tok())

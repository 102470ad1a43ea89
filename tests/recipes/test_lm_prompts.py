"""Prompts as a decoder sees them (``exitwise.recipes.lm_prompts``): one BOS for a tokenizer that adds
one, whether the prompt goes through the chat template (which writes it) or not (where the
tokenizer adds it), in decoding and in the continuations that tuning trains on."""

from __future__ import annotations

import json

import pytest
from helpers.chat_lm import save_tiny_chat_llama

from exitwise.recipes.lm import TuneLMJob, prompt_batch, prompt_ids, run_tune_lm

BOS, EOS, UNK = 1, 2, 3
HI, CAT = 6 + 12, 6 + 1  # "hi", "cat" in helpers.chat_lm.WORDS after the 6 special tokens
# "<user>" and "<assistant>" are not special tokens of the fixture: each reads as 3 unknowns
USER = ASSISTANT = [UNK] * 3


@pytest.fixture(scope="module")
def bos_lm_dir(tmp_path_factory):
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-llama-bos"), bos=True)


@pytest.fixture(scope="module")
def bos_tokenizer(bos_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_lm_dir)
    assert tok("hi cat")["input_ids"] == [BOS, HI, CAT]  # the fixture adds BOS to text
    return tok


def test_one_bos_with_and_without_the_chat_template(bos_tokenizer):
    # the template writes "<bos><user> hi cat <eos> <assistant> "; nothing is added to it
    want = [BOS, *USER, HI, CAT, EOS, *ASSISTANT]
    assert prompt_ids(bos_tokenizer, ["hi cat"]) == [want]
    # what HF's own chat path gives
    assert bos_tokenizer.apply_chat_template([{"role": "user", "content": "hi cat"}],
                                             add_generation_prompt=True)["input_ids"] == want
    # plain text: the tokenizer's own BOS (before, none: a Llama saw its prompts without it)
    assert prompt_ids(bos_tokenizer, ["hi cat"], chat=False) == [[BOS, HI, CAT]]


@pytest.mark.parametrize("chat", [None, False])
def test_the_padded_batch_holds_the_same_ids_left_padded(bos_tokenizer, chat):
    prompts = ["hi", "hi cat cat"]
    ids, mask = prompt_batch(bos_tokenizer, prompts, chat=chat)
    for row, m, want in zip(ids.tolist(), mask.tolist(), prompt_ids(bos_tokenizer, prompts, chat)):
        assert [t for t, k in zip(row, m) if k] == want
        assert m == [0] * (len(m) - len(want)) + [1] * len(want)  # padding on the left


def test_tuning_continues_prompts_with_one_bos(bos_lm_dir, tmp_path):
    out = tmp_path / "tuned"
    job = TuneLMJob(out_dir=str(out), model=str(bos_lm_dir), exit_layers=[2], objective="kl",
                    gen_tokens=3, num_generations=1,
                    options={"steps": 1, "batch_size": 2, "seq_len": 16})
    run_tune_lm(job, print_fn=lambda *a, **k: None, prompts=["hi cat", "hi"])
    key = json.loads((out / "self_generated.json").read_text())["key"]
    # before, the templated text was tokenized with the tokenizer's BOS added: two of them
    assert key["prompts"] == [[BOS, *USER, HI, CAT, EOS, *ASSISTANT],
                              [BOS, *USER, HI, EOS, *ASSISTANT]]

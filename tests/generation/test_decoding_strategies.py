"""Decoding strategies registered by name, each refusing options that are not its own, and
the generation config shared by all (``exitwise.generation.strategies``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers.lmkit import EOS, PAD, left_padded, tiny_lm

import exitwise as ew
from exitwise.generation import (
    DECODING_STRATEGIES,
    DecodingStrategy,
    GenerateOutput,
    GenerationConfig,
    SelfSpeculative,
    get_decoding_strategy,
    greedy_decode,
    register_decoding_strategy,
)
from exitwise.generation.strategies import session_for, stats_for


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


def test_each_strategy_refuses_the_options_of_another(llama):
    ids, mask = left_padded()
    with pytest.raises(ew.ConfigError, match="draft_len is an option of 'anpd', "
                                              "'layer_skip', 'self_speculative', 'swift'"):
        ew.generate(llama, ids, mask, draft_len=3)
    with pytest.raises(ew.ConfigError, match="kv is an option of 'early_exit'"):
        ew.generate(llama, ids, mask, strategy="self_speculative", exit_layer=2, kv="skip")
    with pytest.raises(ew.ConfigError, match="beam_width is not an option of any strategy"):
        ew.generate(llama, ids, mask, beam_width=4)
    with pytest.raises(ew.ConfigError, match="decodes greedily"):
        ew.generate(llama, ids, mask, strategy="early_exit", do_sample=True)
    with pytest.raises(ew.ConfigError, match="unknown decoding strategy"):
        ew.generate(llama, ids, mask, strategy="beam")
    with pytest.raises(ew.ConfigError, match="strategy object itself"):
        ew.generate(llama, ids, mask, strategy=SelfSpeculative(exit_layer=2), draft_len=2)
    with pytest.raises(ew.ConfigError, match="draft_len"):
        SelfSpeculative(exit_layer=2, draft_len=0)
    # None means "not given": callers may pass every option and leave the others' unset
    out = ew.generate(llama, ids, mask, max_new_tokens=3, draft_len=None, kv=None)
    assert out.stats.strategy == "greedy"


def test_a_config_object_and_keywords_decode_the_same(llama):
    ids, mask = left_padded()
    config = GenerationConfig(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    by_object = ew.generate(llama, ids, mask, config,
                            strategy=SelfSpeculative(exit_layer=2, draft_len=3))
    by_keywords = ew.generate(llama, ids, mask, strategy="self_speculative", exit_layer=2,
                              draft_len=3, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    greedy = ew.generate(llama, ids, mask, config)
    assert torch.equal(by_object.sequences, by_keywords.sequences)
    assert torch.equal(by_object.sequences, greedy.sequences)  # lossless
    # keywords override the config's fields
    shorter = ew.generate(llama, ids, mask, config, max_new_tokens=2)
    assert shorter.sequences.shape[1] == ids.shape[1] + 2
    # an option left unset takes its default when decoding (drafts of 4)
    assert get_decoding_strategy("self_speculative", exit_layer=2).draft_len is None
    unset = ew.generate(llama, ids, mask, config, strategy="self_speculative", exit_layer=2)
    assert unset.stats.draft_len == 4


def test_a_new_strategy_plugs_in_by_registration(llama):
    """One class: registered, given its own option, run by generate with the shared config
    (here plain greedy that records the option, to show it arrived)."""

    @dataclass
    class Recorder(DecodingStrategy):
        note: str = ""

        def decode(self, inputs):
            stats = stats_for(inputs, self.registered_name)
            stats.note = self.note
            return GenerateOutput(greedy_decode(session_for(inputs, stats), inputs.sampler),
                                  stats)

    register_decoding_strategy("recorder_for_test")(Recorder)
    try:
        ids, mask = left_padded()
        out = ew.generate(llama, ids, mask, strategy="recorder_for_test", note="hi",
                          max_new_tokens=4)
        ref = ew.generate(llama, ids, mask, max_new_tokens=4)
        assert out.stats.note == "hi" and torch.equal(out.sequences, ref.sequences)
        with pytest.raises(ew.ConfigError, match="registered twice"):
            register_decoding_strategy("recorder_for_test")(type("Other", (Recorder,), {}))
    finally:
        DECODING_STRATEGIES.unregister("recorder_for_test")
    assert "recorder_for_test" not in DECODING_STRATEGIES
    assert {"greedy", "self_speculative", "early_exit"} <= set(DECODING_STRATEGIES)

"""Greedy decoding through the adapter == Hugging Face ``generate(do_sample=False)``."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, EOS, PAD, hf_greedy, left_padded, tiny_lm

from exitwise.generation import generate

NEW = 12


@pytest.fixture(scope="module", params=DECODER_FAMILIES)
def lm(request):
    return request.param, tiny_lm(request.param)


@pytest.mark.parametrize("batch", ["single", "padded3"])
def test_greedy_equals_hf_generate(lm, batch):
    _, model = lm
    ids, mask = left_padded()
    if batch == "single":
        ids, mask = ids[:1], mask[:1]
    ref = hf_greedy(model, ids, mask, NEW, eos=EOS)
    out = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    stats = out.stats
    assert stats.strategy == "greedy" and stats.total_drafted == 0
    for r, row in enumerate(out.sequences[:, ids.shape[1] :].tolist()):
        expected = row.index(EOS) + 1 if EOS in row else NEW
        assert stats.new_tokens[r] == expected
    # finished rows leave the batch, so every decoded token costs exactly one full pass
    assert stats.layer_applications_per_token == pytest.approx(model.config.num_hidden_layers)


def test_eos_stops_each_row_on_its_own(lm):
    _, model = lm
    ids, mask = left_padded()
    plain = hf_greedy(model, ids, mask, NEW, eos=EOS)[:, ids.shape[1] :]
    eos = int(plain[1, 3])  # row 1 stops at its 4th token (or earlier if it repeats)
    ref = hf_greedy(model, ids, mask, NEW, eos=eos)
    out = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[eos], pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    first = (plain[1] == eos).nonzero()[0, 0].item()
    assert out.stats.new_tokens[1] == first + 1
    assert out.sequences[1, ids.shape[1] + first] == eos
    assert (out.sequences[1, ids.shape[1] + first + 1 :] == PAD).all()

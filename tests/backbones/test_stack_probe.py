"""The timed whole-decoder pass of the end-to-end kernel check (exitwise.backbones.stack_probe)."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import REQUIRED_FAMILIES, tiny_lm

from exitwise.backbones import decoder_of
from exitwise.backbones.stack_probe import DecoderStackProbe


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_a_probe_runs_every_block_and_the_lm_head_on_the_rows_and_changes_nothing(family):
    model = tiny_lm(family)
    bb, _ = decoder_of(model)
    ids = torch.randint(3, 90, (1, 6))
    with torch.inference_mode():
        before = model(ids).logits
    seen: list[tuple[str, tuple]] = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(("block", a[0].shape)))
             for b in bb.blocks]
    hooks.append(bb.lm_head.register_forward_hook(
        lambda m, a, o: seen.append(("head", a[0].shape))))
    probe = DecoderStackProbe(bb, context=20)
    try:
        probe(2)  # the first pass also fills the probe's cache of 20 context tokens
        assert seen[: bb.num_layers] == [("block", (1, 20, 32))] * bb.num_layers
        for rows in (1, 3):
            seen.clear()
            assert probe(rows) > 0.0
            # rows new tokens (batch 1) through all L blocks, then the LM head on each row
            assert seen == [("block", (1, rows, 32))] * bb.num_layers + [
                ("head", (1, rows, 32))]
    finally:
        for h in hooks:
            h.remove()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    assert probe._cache is not None and probe._cache.get_seq_length() == 20  # copied, not grown


def test_the_key_names_the_architecture_and_shapes_and_the_context_fits_the_positions():
    a = DecoderStackProbe(decoder_of(tiny_lm("llama"))[0])
    assert a.key == DecoderStackProbe(decoder_of(tiny_lm("llama", seed=1))[0]).key
    assert a.key != DecoderStackProbe(decoder_of(tiny_lm("llama", layers=3))[0]).key
    assert a.key != DecoderStackProbe(decoder_of(tiny_lm("qwen2"))[0]).key
    assert a.context == 64 and a.key.endswith(":c64")
    gpt2 = DecoderStackProbe(decoder_of(tiny_lm("gpt2"))[0], context=200, max_rows=8)
    assert gpt2.context == 64 - 8  # n_positions 64: room left for the probe's rows
    assert gpt2(8) > 0.0

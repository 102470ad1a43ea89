"""A block's two sub-layers (``HFDecoderBackbone.run_part``), for every decoder family: running
"attn" then "mlp" is the block itself, bit for bit and cache included (self-drafts that skip
sub-layers, Draft & Verify and SWIFT, rely on it); the parameter counts by part."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, VOCAB, left_padded, tiny_lm

import exitwise as ew
from exitwise.backbones import DecodeContext
from exitwise.backbones.hf_decoder import prompt_positions
from exitwise.errors import InputError


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@torch.no_grad()
def test_attention_then_feed_forward_is_the_block(family):
    model = tiny_lm(family, layers=3)
    bb = ew.wrap_backbone(model)
    ids, mask = left_padded()
    pos = prompt_positions(mask)
    tok = torch.randint(3, VOCAB, (ids.shape[0], 2), generator=torch.Generator().manual_seed(2))
    full_mask = torch.cat([mask, torch.ones_like(tok)], 1)
    next_pos = mask.sum(1, keepdim=True) + torch.arange(2)
    outs, caches = [], []
    for by_parts in (False, True):
        cache = bb.new_cache()
        hidden = bb.embed(ids, pos)
        hidden_new = bb.embed(tok, next_pos)
        for i in range(bb.num_layers):  # the prompt, then two new tokens, through the cache
            ctx = DecodeContext(cache, pos, mask)
            if by_parts:
                hidden = bb.run_part(i, "mlp", bb.run_part(i, "attn", hidden, ctx), ctx)
            else:
                hidden = bb.run_layers(hidden, i, i + 1, ctx)
        for i in range(bb.num_layers):
            ctx_new = DecodeContext(cache, next_pos, full_mask)
            if by_parts:
                hidden_new = bb.run_part(i, "attn", hidden_new, ctx_new)
                hidden_new = bb.run_part(i, "mlp", hidden_new, ctx_new)
            else:
                hidden_new = bb.run_layers(hidden_new, i, i + 1, ctx_new)
        outs.append((hidden, hidden_new))
        caches.append(cache)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_feed_forward_alone_leaves_the_cache_alone_and_parts_are_named():
    model = tiny_lm("llama", layers=3)
    bb = ew.wrap_backbone(model)
    ids = torch.tensor([[5, 6, 7]])
    pos = prompt_positions(torch.ones_like(ids))
    cache = bb.new_cache()
    ctx = DecodeContext(cache, pos, torch.ones_like(ids))
    bb.run_part(1, "mlp", bb.embed(ids, pos), ctx)
    assert cache.get_seq_length(1) == 0
    with pytest.raises(InputError, match="part"):
        bb.run_part(1, "ffn", bb.embed(ids, pos), ctx)


def test_part_sizes_count_every_parameter_of_the_block():
    for family in ("llama", "gpt2", "gemma2"):
        bb = ew.wrap_backbone(tiny_lm(family, layers=3))
        sizes = bb.part_sizes()
        assert len(sizes) == 3
        for (attn, mlp), block in zip(sizes, bb.blocks):
            assert attn > 0 and mlp > 0
            assert attn + mlp == sum(p.numel() for p in block.parameters())


def test_a_misspelt_input_is_refused_not_ignored():
    # attention_masks (sic) once decoded a left-padded batch as if unpadded
    model = ew.attach_exits(tiny_lm("llama", layers=3), layers=[1], head="lm")
    ids, mask = left_padded()
    with pytest.raises(InputError, match=r"unexpected inputs \['attention_masks'\]"):
        model(input_ids=ids, attention_masks=mask)
    with pytest.raises(InputError, match=r"unexpected inputs \['mask'\]"):
        model.backbone.check_inputs(input_ids=ids, mask=mask)

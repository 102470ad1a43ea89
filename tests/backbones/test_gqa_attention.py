"""Grouped-query attention views (:mod:`exitwise.backbones.gqa_attention`): several new tokens
under a mask attend without copying the cache's keys/values, bit for bit as transformers'
SDPA path, and nothing of the user's model changes."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, VOCAB, left_padded, tiny_lm

import exitwise as ew
from exitwise.backbones import DecodeContext
from exitwise.backbones.gqa_attention import ATTENTION, gqa_sdpa_attention, grouped
from exitwise.backbones.hf_decoder import prompt_positions


def _prompt_then_new(bb, views: bool):
    """A left-padded prompt through every block, then three new tokens after it (a masked
    pass of several positions): the new tokens' last hidden states and the cache. views:
    False runs every block itself (the GQA views switched off)."""
    if not views:
        bb._gqa_views = {id(b): (b, b) for b in bb.blocks}
    ids, mask = left_padded()
    pos = prompt_positions(mask)
    tok = torch.randint(3, VOCAB, (ids.shape[0], 3), generator=torch.Generator().manual_seed(2))
    full_mask = torch.cat([mask, torch.ones_like(tok)], 1)
    next_pos = mask.sum(1, keepdim=True) + torch.arange(3)
    cache = bb.new_cache()
    bb.run_layers(bb.embed(ids, pos), 0, bb.num_layers, DecodeContext(cache, pos, mask))
    ctx = DecodeContext(cache, next_pos, full_mask)
    return bb.run_layers(bb.embed(tok, next_pos), 0, bb.num_layers, ctx), cache


def model_blocks(model):
    return ew.wrap_backbone(model).blocks


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@torch.no_grad()
def test_views_attend_exactly_as_the_blocks_and_change_nothing(family):
    model = tiny_lm(family, layers=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attn_impl = model.config._attn_implementation
    outs = {}
    for views in (True, False):
        bb = ew.wrap_backbone(model)
        outs[views] = _prompt_then_new(bb, views)
        if views:
            used = [view is not block for block, view in bb._gqa_views.values()]
    # bit for bit the same hidden states and caches
    assert torch.equal(outs[True][0], outs[False][0])
    for a, b in zip(outs[True][1].layers, outs[False][1].layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # a view exactly where attention has key/value groups under SDPA (the tiny models have 4
    # query heads on 2 key/value heads; Gemma-2 runs eager attention, GPT-2 has no groups)
    attn = ew.wrap_backbone(model).layout.attn
    expected = grouped(model_blocks(model)[0], attn)
    assert expected == (family not in ("gpt2", "gemma2"))
    assert len(used) == 3 and all(u == expected for u in used)
    # the user's model is untouched: config, weights, modules
    assert model.config._attn_implementation == attn_impl != ATTENTION
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


@torch.no_grad()
def test_a_view_shares_the_blocks_parameters_and_reads_the_live_config():
    model = tiny_lm("llama", layers=3)
    bb = ew.wrap_backbone(model)
    block = bb.blocks[1]
    hidden, mask = torch.zeros(1, 3, bb.hidden_size), torch.ones(1, 1, 3, 3, dtype=torch.bool)
    view = bb._attention_view(block, hidden, mask)
    assert view is not block and bb._attention_view(block, hidden, mask) is view  # made once
    assert view.self_attn is not block.self_attn
    assert all(a is b for a, b in zip(view.parameters(), block.parameters()))
    assert view.self_attn.config._attn_implementation == ATTENTION
    assert view.self_attn.config.num_key_value_heads == model.config.num_key_value_heads
    with pytest.raises(AttributeError):
        view.self_attn.config.num_key_value_heads = 4
    # in-place weight changes show through the view
    with torch.no_grad():
        block.self_attn.q_proj.weight.mul_(2.0)
    assert torch.equal(view.self_attn.q_proj.weight, block.self_attn.q_proj.weight)


@pytest.mark.parametrize("q", [1, 3])
@torch.no_grad()
def test_the_attention_function_equals_transformers_sdpa(q):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)

    class Module(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    query = torch.randn(2, 6, q, 8, generator=g)
    key, value = (torch.randn(2, 2, 10, 8, generator=g) for _ in range(2))
    slots = torch.arange(10)
    mask = (slots[None, :] <= slots[10 - q:, None])[None, None].expand(2, 1, q, 10).clone()
    mask[1, :, :, :4] = False  # left padding of the second row
    ours, _ = gqa_sdpa_attention(Module(), query, key, value, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(Module(), query, key, value, mask, scaling=0.3)
    assert ours.shape == (2, q, 6, 8) and torch.equal(ours, ref)
    # transformers' own refusals stay (a soft-cap is not SDPA's)
    with pytest.raises(ValueError):
        gqa_sdpa_attention(Module(), query, key, value, mask, softcap=5.0)

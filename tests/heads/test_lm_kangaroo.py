"""The ``lm`` head's Kangaroo adapter: one attention sub-layer (input norm + attention +
residual, no feed-forward) and an own final norm, read out by the shared LM head."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, VOCAB, left_padded, tiny_lm

import exitwise as ew
from exitwise.backbones.hf_decoder import DecodeContext, prompt_positions
from exitwise.heads.lm import ZeroFeedForward


def attach(model, adapter: str = "kangaroo"):
    config = ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                           head_kwargs={"adapter": adapter}, final_head_kwargs={})
    return ew.attach_exits(model, config).eval()


def reference(bb, head, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h + attention(norm_1(h)) computed by a copy of the last block holding the adapter's
    weights, its feed-forward output forced to zero by a hook, then the adapter's own norm
    and the shared LM head: (B, T, H) -> (B, T, V)."""
    block = copy.deepcopy(bb.blocks[bb.num_layers - 1])
    missing = block.load_state_dict(head.block.state_dict(), strict=False).missing_keys
    assert missing and all(".mlp." in f".{k}" for k in missing)  # only the feed-forward
    block.mlp.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    ctx = DecodeContext(None, prompt_positions(mask), mask)
    out = bb.run_block(block, bb.num_layers - 1, bb.layer_types[-1], hidden, ctx)
    return bb.lm_logits(head.norm(out))


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@torch.no_grad()
def test_attention_only_adapter_for_every_family(family):
    model = tiny_lm(family)
    multi = attach(model)
    head, bb = multi.heads[0], multi.backbone
    assert head.uses_cache and head.cache_index == bb.num_layers
    assert isinstance(head.block.mlp, ZeroFeedForward)
    names = set(head.state_dict())
    assert not any(".mlp." in n for n in names)  # no feed-forward weights at all
    assert any("attn" in n for n in names) and "norm.weight" in names  # attention + own norm
    ids, mask = left_padded()
    torch.manual_seed(0)
    hidden = torch.randn(ids.shape[0], ids.shape[1], bb.hidden_size)
    ctx = DecodeContext(None, prompt_positions(mask), mask)
    torch.testing.assert_close(head.token_logits(hidden, ctx), reference(bb, head, hidden, mask),
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_feed_forward_is_really_gone():
    model = tiny_lm("llama")
    kangaroo, block = attach(model).heads[0], attach(model, "block").heads[0]
    hidden = torch.randn(2, 5, 32)
    assert not torch.allclose(kangaroo.token_logits(hidden), block.token_logits(hidden))
    # Llama: the block adapter with Kangaroo's attention and its down projection zeroed gives
    # Kangaroo's output (the tiny model's final norm is at identity, as Kangaroo's own)
    with torch.no_grad():
        block.block.load_state_dict(kangaroo.block.state_dict(), strict=False)
        block.block.mlp.down_proj.weight.zero_()
    torch.testing.assert_close(kangaroo.token_logits(hidden), block.token_logits(hidden))
    # the cost counts projections without the MLP
    mask = torch.ones(2, 5, dtype=torch.long)
    assert bool((kangaroo.head_flops(mask, 2) < block.head_flops(mask, 2)).all())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_the_adapter_starts_fresh_as_in_the_reference(family):
    """Kangaroo's adapter is a new layer: its projections are drawn by the model's own
    initializer (normal(0, initializer_range)), its norms start at identity -- not copied
    from the last block."""
    model = tiny_lm(family)
    head, bb = attach(model).heads[0], ew.wrap_backbone(model)
    last = dict(bb.blocks[bb.num_layers - 1].named_parameters())
    std = model.config.initializer_range
    projections = 0
    for name, p in head.block.named_parameters():
        if p.dim() == 2:  # a projection: fresh, of the initializer's spread
            projections += 1
            assert not torch.equal(p, last[name]), name
            assert 0.6 * std < float(p.detach().std()) < 1.4 * std, name
    assert projections >= 2
    identity = 0.0 if family == "gemma2" else 1.0  # Gemma norms scale by (1 + w)
    assert torch.equal(head.norm.weight.detach(), torch.full_like(head.norm.weight, identity))


def test_trainable_pieces_get_gradients_and_save_back(tmp_path):
    model = tiny_lm("llama")
    multi = attach(model)
    multi.train()
    ids, mask = left_padded()
    multi(input_ids=ids, attention_mask=mask).logits[0].logsumexp(-1).sum().backward()
    head = multi.heads[0]
    grads = {n: p.grad for n, p in head.named_parameters()}
    assert grads["norm.weight"] is not None
    assert all(grads[n] is not None for n in grads if "attn" in n or "input_layernorm" in n)
    # the norm that fed the removed feed-forward gets nothing (documented deviation)
    assert grads["block.post_attention_layernorm.weight"] is None
    model.zero_grad(set_to_none=True)
    multi.eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    multi.save_pretrained(tmp_path)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=model)
    for (na, a), (nb, b) in zip(multi.heads.state_dict().items(),
                                loaded.heads.state_dict().items()):
        assert na == nb and torch.equal(a, b)
    assert isinstance(loaded.heads[0].block.mlp, ZeroFeedForward)

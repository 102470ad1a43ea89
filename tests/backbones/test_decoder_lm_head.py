"""The ``lm`` exit head: shared final norm + LM head, trainable pieces saved alone."""

from __future__ import annotations

import pytest
import torch
from helpers.lmkit import DECODER_FAMILIES, VOCAB, left_padded, tiny_lm
from safetensors.torch import load_file

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.heads.lm import LMHead
from exitwise.model import HEADS_NAME

ADAPTER_PARAMS = {
    "none": set(),
    "norm": {"norm.weight"},
    "mlp": {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"},
}


@pytest.fixture(scope="module")
def llama():
    return tiny_lm("llama")


def attach(model, **head_kwargs):
    """An lm exit after block 2 with ``head_kwargs``; the final exit stays the plain readout."""
    config = ew.ExitConfig(
        layers=[2], head="lm", num_labels=VOCAB, head_kwargs=head_kwargs, final_head_kwargs={}
    )
    return ew.attach_exits(model, config).eval()


@torch.no_grad()
def test_shared_exit_is_the_models_own_readout(llama):
    multi = attach(llama)
    ids, mask = left_padded()
    outs = multi(input_ids=ids, attention_mask=mask).logits
    assert [o.shape for o in outs] == [(3, VOCAB), (3, VOCAB)]
    bb = multi.backbone
    state = bb.start(input_ids=ids, attention_mask=mask)
    for i in range(2):
        state = bb.step(i, state)
    expected = bb.lm_logits(bb.final_norm(state.hidden[:, -1]))
    torch.testing.assert_close(outs[0], expected)
    # every head shares the backbone's modules: nothing of its own to save
    assert all(len(h.state_dict()) == 0 for h in multi.heads)
    assert multi.heads[0].token_logits(state.hidden).shape == (3, ids.shape[1], VOCAB)


@pytest.mark.parametrize("adapter", ["none", "norm", "mlp"])
@torch.no_grad()
def test_adapters_start_as_the_shared_exit(llama, adapter):
    multi = attach(llama, adapter=adapter)
    plain = attach(llama)
    ids, mask = left_padded()
    torch.testing.assert_close(
        multi(input_ids=ids, attention_mask=mask).logits[0],
        plain(input_ids=ids, attention_mask=mask).logits[0],
    )
    assert set(multi.heads[0].state_dict()) == ADAPTER_PARAMS[adapter]


@pytest.mark.parametrize(
    "kwargs, own",
    [
        ({}, set()),
        ({"adapter": "mlp"}, ADAPTER_PARAMS["mlp"]),
        ({"adapter": "norm", "untied": True}, {"norm.weight", "lm_head.weight"}),
        ({"adapter": "block"}, None),
    ],
    ids=["shared", "mlp", "norm+untied", "block"],
)
def test_save_only_trainable_parts_and_load_back(llama, tmp_path, kwargs, own):
    torch.manual_seed(5)
    multi = attach(llama, **kwargs)
    with torch.no_grad():  # pretend training moved the trainable pieces
        for p in multi.heads.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    multi.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / HEADS_NAME))
    names = {k.split(".", 2)[2] for k in saved if k.startswith("heads.0.")}
    if own is None:  # a block copy: its own weights, nothing of the shared readout
        assert names and all(n.startswith("block.") for n in names)
    else:
        assert names == own
    assert not any(k.startswith("heads.1.") for k in saved)  # final exit: all shared
    assert not any("embed" in k for k in saved)

    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=llama)
    for a, b in zip(multi.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    ids, mask = left_padded()
    with torch.no_grad():
        for x, y in zip(multi(input_ids=ids, attention_mask=mask).logits,
                        loaded(input_ids=ids, attention_mask=mask).logits):
            torch.testing.assert_close(x, y)


def test_only_adapter_parameters_are_the_heads(llama):
    multi = attach(llama, adapter="mlp")
    head_params = {id(p) for p in multi.heads.parameters()}
    backbone_params = {id(p) for p in multi.backbone.parameters()}
    assert head_params and not head_params & backbone_params
    ids, mask = left_padded()
    multi.train()
    loss = multi(input_ids=ids, attention_mask=mask).logits[0].logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in multi.heads.parameters())
    llama.zero_grad(set_to_none=True)


def test_block_adapter_reads_the_whole_sequence(llama):
    multi = attach(llama, adapter="block")
    head = multi.heads[0]
    assert head.uses_cache and head.cache_index == llama.config.num_hidden_layers
    ids, mask = left_padded()
    with torch.no_grad():
        out = multi(input_ids=ids, attention_mask=mask).logits[0]
        # row alone == row in the padded batch (the block attends over real tokens only)
        alone = multi(input_ids=ids[1:2, mask[1].bool()]).logits[0]
    torch.testing.assert_close(alone[0], out[1], atol=2e-5, rtol=1e-4)


def test_bad_lm_head_requests(llama):
    with pytest.raises(ConfigError, match="vocab size"):
        ew.attach_exits(llama, ew.ExitConfig(layers=[2], head="lm", num_labels=7))
    with pytest.raises(ConfigError, match="adapter"):
        ew.build_head("lm", 32, VOCAB, adapter="lora")
    with pytest.raises(ConfigError, match="mlp_hidden sizes the 'mlp' adapter"):
        ew.build_head("lm", 32, VOCAB, adapter="none", mlp_hidden=64)  # was ignored
    with pytest.raises(ConfigError, match="mlp_hidden"):
        ew.build_head("lm", 32, VOCAB, adapter="mlp", mlp_hidden=0)
    from conftest import tiny_encoder

    with pytest.raises(ConfigError, match="decoder backbone"):
        ew.attach_exits(tiny_encoder("bert"), ew.ExitConfig(head="lm", num_labels=VOCAB))
    unbound = LMHead(32, VOCAB)
    assert not unbound.bound and unbound(torch.randn(2, 5, 32)).shape == (2, VOCAB)


def test_saved_backbone_reloads_as_a_causal_lm(llama, tmp_path):
    multi = attach(llama, adapter="mlp")
    multi.save_pretrained(tmp_path, save_backbone=True)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path)  # AutoModelForCausalLM under the hood
    assert type(loaded.backbone.model) is type(llama)
    ids, mask = left_padded()
    with torch.no_grad():
        for x, y in zip(multi(input_ids=ids, attention_mask=mask).logits,
                        loaded(input_ids=ids, attention_mask=mask).logits):
            torch.testing.assert_close(x, y)


def test_tied_embeddings_are_shared_not_saved(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    tied = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        )
    ).eval()
    multi = attach(tied)
    multi.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / HEADS_NAME))) == {"temperatures"}
    untied = attach(tied, untied=True)
    own = untied.heads[0].lm_head.weight
    assert torch.equal(own, tied.model.embed_tokens.weight)
    assert own.data_ptr() != tied.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("kwargs", [{"adapter": "mlp", "draft_vocab": 40}, {"adapter": "norm"},
                                    {"untied": True, "draft_vocab": 17}])
def test_draft_logits_equal_compact_logits(llama, kwargs):
    model = attach(llama, **kwargs)
    head = model.heads[0]
    if head.vocab_ids is not None:
        head.set_draft_vocab(torch.randperm(VOCAB)[: head.draft_vocab])
    hidden = torch.randn(2, 3, llama.config.hidden_size)
    with torch.inference_mode():
        want = head.compact_logits(hidden)
        got = head.draft_logits(hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if head.vocab_ids is not None:  # a new vocabulary is picked up
            head.set_draft_vocab(torch.arange(head.draft_vocab))
            torch.testing.assert_close(head.draft_logits(hidden), head.compact_logits(hidden),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("adapter", ["norm", "mlp"])
def test_save_load_round_trip_for_every_family(family, adapter, tmp_path):
    # was checked on llama only: every family's exits (and a saved fine-tuned backbone)
    # come back bit-identical
    torch.manual_seed(0)
    multi = attach(tiny_lm(family), adapter=adapter)
    with torch.no_grad():
        for p in multi.heads[0].parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values
    multi.save_pretrained(tmp_path / "heads")
    multi.save_pretrained(tmp_path / "whole", save_backbone=True)
    ids, mask = left_padded()
    with torch.no_grad():
        want = multi(input_ids=ids, attention_mask=mask).logits
        for loaded in (ew.MultiExitModel.from_pretrained(tmp_path / "heads",
                                                         backbone=tiny_lm(family)),
                       ew.MultiExitModel.from_pretrained(tmp_path / "whole")):
            got = loaded(input_ids=ids, attention_mask=mask).logits
            assert all(torch.equal(a, b) for a, b in zip(want, got))

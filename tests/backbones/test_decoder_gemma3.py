"""Gemma-3 text specifics of the decoder adapter (the shared family tests run it too).

- every block gets the rotary table of its own attention type (local theta for sliding-window
  blocks, global theta for full-attention ones), and the two tables really differ;
- the tiny model's window is short enough that the test sequences cross it (a wide window
  changes the logits), and the adapter still matches the model's own forward;
- optional final-logit soft-capping is applied as the model does;
- never-exit early-exit decoding equals plain greedy decoding, past the window;
- bidirectional (EmbeddingGemma-style) configs and the multimodal wrapper fail clearly.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers.lmkit import EOS, left_padded, tiny_lm
from torch import nn

import exitwise as ew
from exitwise.backbones.hf_decoder import FULL, SLIDING, prompt_positions
from exitwise.errors import UnsupportedModelError
from exitwise.generation import generate
from exitwise.policies import get_policy

ATOL = 2e-5


@pytest.fixture(scope="module")
def gemma3():
    return tiny_lm("gemma3")


def long_batch():
    """Left-padded prompts longer than the window (8): 14, 5 and 11 real tokens."""
    return left_padded((14, 5, 11), seed=4)


def own_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask)).logits


def contract_logits(bb, ids, mask):
    with torch.no_grad():
        state = bb.start(input_ids=ids, attention_mask=mask)
        for i in range(bb.num_layers):
            state = bb.step(i, state)
        return bb.lm_logits(bb.final_norm(state.hidden))


@torch.no_grad()
def test_each_block_gets_the_rotary_table_of_its_type(gemma3):
    bb = ew.wrap_backbone(gemma3)
    assert bb.model_type == "gemma3_text" and bb.layout.rope_per_layer_type
    assert bb.layer_types == [SLIDING, SLIDING, FULL, SLIDING]
    ids, mask = long_batch()
    pos = prompt_positions(mask)
    hidden = bb.embed(ids, pos)
    local = bb.rotary(hidden, pos, SLIDING)
    glob = bb.rotary(hidden, pos, FULL)
    # Different thetas give different angles once positions pass 0.
    assert not torch.allclose(local[0], glob[0], atol=1e-3)

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        block.register_forward_pre_hook(
            lambda _m, _a, kw, i=i: seen.__setitem__(i, kw["position_embeddings"]),
            with_kwargs=True,
        )
        for i, block in enumerate(bb.blocks)
    ]
    try:
        state = bb.start(input_ids=ids, attention_mask=mask)
        for i in range(bb.num_layers):
            state = bb.step(i, state)
    finally:
        for h in hooks:
            h.remove()
    for i, kind in enumerate(bb.layer_types):
        want = local if kind == SLIDING else glob
        torch.testing.assert_close(seen[i][0], want[0])
        torch.testing.assert_close(seen[i][1], want[1])


@torch.no_grad()
def test_sliding_window_matters_and_is_reproduced(gemma3):
    ids, mask = long_batch()
    real = mask.bool()
    narrow = own_logits(gemma3, ids, mask)
    torch.testing.assert_close(
        contract_logits(ew.wrap_backbone(gemma3), ids, mask)[real], narrow[real],
        atol=ATOL, rtol=1e-4,
    )
    wide_model = copy.deepcopy(gemma3)
    wide_model.config.sliding_window = 64
    wide = own_logits(wide_model, ids, mask)
    # The rows longer than the window see a different context with a wide window...
    assert (narrow[real] - wide[real]).abs().max() > 1e-3
    # ...and the adapter follows the config it is given, not a fixed window.
    torch.testing.assert_close(
        contract_logits(ew.wrap_backbone(wide_model), ids, mask)[real], wide[real],
        atol=ATOL, rtol=1e-4,
    )


@torch.no_grad()
def test_final_logit_softcapping_is_applied(gemma3):
    capped = copy.deepcopy(gemma3)
    capped.config.final_logit_softcapping = 0.5
    ids, mask = long_batch()
    real = mask.bool()
    want = own_logits(capped, ids, mask)[real]
    assert want.abs().max() <= 0.5  # the cap is active on these logits
    assert (want - own_logits(gemma3, ids, mask)[real]).abs().max() > 1e-3
    got = contract_logits(ew.wrap_backbone(capped), ids, mask)[real]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_never_exit_decoding_equals_greedy_past_the_window(gemma3, kv):
    ids, mask = left_padded((7, 3, 5))
    new = 12  # 7 + 12 tokens: well past the window of 8
    ref = generate(gemma3, ids, mask, max_new_tokens=new, eos_token_id=EOS)
    out = generate(
        gemma3, ids, mask, strategy="early_exit", kv=kv, max_new_tokens=new, eos_token_id=EOS,
        policy=get_policy("calm_softmax", threshold=1.0, tau=0.0),
    )
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.early_exit_rate == 0.0


def test_bidirectional_and_multimodal_gemma3_fail_clearly(gemma3):
    bidir = copy.deepcopy(gemma3)
    bidir.config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        ew.wrap_backbone(bidir)

    class Multimodal(nn.Module):  # stands in for Gemma3ForConditionalGeneration
        config = SimpleNamespace(model_type="gemma3")

    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM") as err:
        ew.backbones.HFDecoderBackbone(Multimodal())
    assert "gemma3_text" in str(err.value)

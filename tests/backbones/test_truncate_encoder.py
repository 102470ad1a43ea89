"""``truncate_encoder``: the first k blocks of an HF encoder, in place, equal to the full model's
state after k blocks, for every supported family; ALBERT's shared layer groups included (cut
where the layer -> group mapping survives, refused elsewhere)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import VOCAB, padded_batch, tiny_encoder

from exitwise.backbones.hf_encoder import truncate_encoder
from exitwise.cascade import cascade_members
from exitwise.errors import ConfigError


def _albert(groups: int, layers: int = 4):
    torch.manual_seed(0)
    return tf.AlbertModel(tf.AlbertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, embedding_size=16,
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_hidden_groups=groups,
        inner_group_num=1)).eval()


def _state_after(model, k: int, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states[k]


@pytest.mark.parametrize(("family", "keep"), [("bert", 2), ("distilbert", 3), ("albert", 2)])
def test_the_cut_model_is_the_full_one_after_k_blocks(family, keep):
    full = tiny_encoder(family)  # the fixture's ALBERT has 2 groups over 4 layers
    batch = padded_batch((7, 4))
    want = _state_after(full, keep, batch)
    cut = truncate_encoder(full, keep)
    with torch.no_grad():
        got = cut(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("groups", "layers", "keep", "kept_groups"),
                         [(1, 4, 3, 1), (1, 4, 1, 1), (2, 4, 2, 1), (2, 4, 1, 1), (2, 4, 3, 2),
                          (4, 4, 3, 3), (2, 6, 3, 1)])
def test_albert_keeps_the_groups_its_first_layers_use(groups, layers, keep, kept_groups,
                                                      tmp_path):
    """Layer i runs group int(i / (L / G)). G=2 of L=4: layers 0, 1 run group 0, so a cut at
    2 (or 1) keeps group 0 alone; a cut at 3 keeps both (int(i / 1.5) = 0, 0, 1, as before)."""
    model, batch = _albert(groups, layers), padded_batch((6, 5))
    want = _state_after(model, keep, batch)
    truncate_encoder(model, keep)
    assert (model.config.num_hidden_layers, model.config.num_hidden_groups) == (keep, kept_groups)
    assert len(model.encoder.albert_layer_groups) == kept_groups
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, want, rtol=0, atol=0)
    model.save_pretrained(tmp_path)  # the config round-trips: the reload is the cut model
    with torch.no_grad():
        again = tf.AlbertModel.from_pretrained(tmp_path).eval()(**batch).last_hidden_state
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_albert_refuses_a_cut_that_would_remap_its_groups():
    # G=2 of L=6: layers 0-2 run group 0, layer 3 group 1. Four layers with two groups would
    # run groups 0, 0, 1, 1; with one, group 0 four times.
    with pytest.raises(ConfigError, match=r"first 4 run groups \[0, 0, 0, 1\]"):
        truncate_encoder(_albert(2, layers=6), 4)
    with pytest.raises(ConfigError, match="1..4"):
        truncate_encoder(_albert(1), 5)


def test_an_albert_cascade_can_be_cut():
    small, large = cascade_members(_albert(1), (2, None), num_labels=2, head="linear")
    assert small.backbone.num_layers == 2 and large.backbone.num_layers == 4

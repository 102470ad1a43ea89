"""Small shared helpers of the backbones: EOS/pad resolution and dotted-path lookup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from exitwise.backbones.base import resolve_path
from exitwise.backbones.special_tokens import eos_and_pad, token_ids
from exitwise.errors import ConfigError


def fake_backbone(gen_eos=None, gen_pad=None, cfg_eos=None, cfg_pad=None):
    gen = SimpleNamespace(eos_token_id=gen_eos, pad_token_id=gen_pad)
    return SimpleNamespace(model=SimpleNamespace(generation_config=gen),
                           config=SimpleNamespace(eos_token_id=cfg_eos, pad_token_id=cfg_pad))


def test_eos_and_pad_follow_argument_then_generation_config_then_config():
    bb = fake_backbone(gen_eos=[2, 7], cfg_eos=9, cfg_pad=5)
    assert eos_and_pad(bb) == ({2, 7}, 5)  # EOS from the generation config, pad from config
    assert eos_and_pad(bb, eos_token_id=3, pad_token_id=0) == ({3}, 0)
    assert eos_and_pad(fake_backbone(cfg_eos=9)) == ({9}, 9)  # pad falls back to EOS
    assert eos_and_pad(fake_backbone()) == (set(), 0)
    assert token_ids(torch.tensor([[4, 5]]), "x") == [4, 5]
    with pytest.raises(ConfigError, match="eos_token_id must be an int"):
        eos_and_pad(bb, eos_token_id="</s>")


def test_resolve_path_walks_attributes_indices_and_alternatives():
    net = nn.Module()
    net.body = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert resolve_path(net, "body.1") is net.body[1]
    assert resolve_path(net, "trunk|body.0") is net.body[0]  # the first alternative present
    assert resolve_path(net, "body.5") is None and resolve_path(net, "head") is None
    assert resolve_path(net, None) is None


def test_eos_ids_fall_back_to_the_tokenizer_last():
    from exitwise.backbones.special_tokens import eos_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None),
                            config=SimpleNamespace(eos_token_id=None))
    assert eos_ids(model, SimpleNamespace(eos_token_id=4)) == {4}
    model.config.eos_token_id = [6, 1]
    assert eos_ids(model, SimpleNamespace(eos_token_id=4)) == {6, 1}
    assert eos_ids(model, None, eos_token_id=8) == {8}
    assert eos_ids(SimpleNamespace(), None) == set()

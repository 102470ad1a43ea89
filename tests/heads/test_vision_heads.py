"""The vision exit heads: ``sdn`` (SDN's mixed max/avg pooling classifier) and ``vit_layer``
(SL-ViT's one-transformer-layer exit). The generic head contract (shapes for every input kind,
masks, row independence, gradients) runs on them in test_head_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.heads.vit_layer import default_num_heads

B, C, L = 3, 8, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def counted_flops(head, *args) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        head(*args)
    return float(counter.get_total_flops())


# -- sdn --------------------------------------------------------------------------------------
def test_sdn_mixes_max_and_average_pooling_to_a_small_map():
    head = ew.build_head("sdn", C, L, dropout=0.0)
    maps = torch.randn(B, C, 9, 7)
    assert head.classifier.in_features == C * 4 * 4
    a = float(head.mix.detach())
    assert 0.0 <= a < 1.0  # SDN's alpha starts as torch.rand(1)
    peak, mean = F.adaptive_max_pool2d(maps, 4), F.adaptive_avg_pool2d(maps, 4)
    torch.testing.assert_close(head.pooled(maps), (a * peak + (1 - a) * mean).flatten(1))
    with torch.no_grad():
        head.mix.fill_(1.0)  # all max pooling
    torch.testing.assert_close(head(maps), head.classifier(peak.flatten(1)))
    with torch.no_grad():
        head.mix.fill_(0.0)  # all average pooling
    torch.testing.assert_close(head(maps), head.classifier(mean.flatten(1)))


def test_sdn_learns_the_mix_unconstrained():
    head = ew.build_head("sdn", C, L, dropout=0.0)
    maps = torch.randn(B, C, 6, 6, requires_grad=True)
    F.cross_entropy(head(maps), torch.tensor([0, 1, 4])).backward()
    assert head.mix.grad is not None and float(head.mix.grad.abs()) > 0
    assert maps.grad is not None and maps.grad.abs().sum() > 0
    with torch.no_grad():
        head.mix.fill_(-0.5)  # as in SDN's code, nothing keeps it in [0, 1]
    peak, mean = F.adaptive_max_pool2d(maps, 4), F.adaptive_avg_pool2d(maps, 4)
    torch.testing.assert_close(head.pooled(maps), (-0.5 * peak + 1.5 * mean).flatten(1))


def test_sdn_pool_size_small_maps_and_tokens():
    head = ew.build_head("sdn", C, L, pool_size=2, dropout=0.0)
    assert head.classifier.in_features == C * 2 * 2
    assert head(torch.randn(B, C, 1, 1)).shape == (B, L)  # smaller than the pooled size
    tokens = torch.randn(B, 6, C)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5])
    pooled = head.pooled(tokens, mask)
    r, a = 1, head.mix.detach()  # row 1: max and mean over its 3 real tokens, at 2x2 positions
    expected = a * tokens[r, :3].amax(0) + (1 - a) * tokens[r, :3].mean(0)
    torch.testing.assert_close(pooled[r].view(C, 4), expected[:, None].expand(C, 4))
    with pytest.raises(ConfigError, match="pool_size"):
        ew.build_head("sdn", C, L, pool_size=0)


def test_sdn_flops_match_the_flop_counter():
    head = ew.build_head("sdn", C, L).eval()
    flops = head.head_flops(None, B)
    assert torch.equal(flops, torch.full((B,), 2.0 * C * 16 * L, dtype=torch.float64))
    assert float(flops[0]) == counted_flops(head, torch.randn(1, C, 8, 8))


# -- vit_layer --------------------------------------------------------------------------------
def test_vit_layer_shapes_and_pooling():
    head = ew.build_head("vit_layer", C, L, dropout=0.0).eval()
    tokens = torch.randn(B, 5, C)
    assert head(tokens).shape == (B, L)
    assert head(torch.randn(B, C, 3, 4)).shape == (B, L)  # 12 tokens, mean-pooled
    assert head(torch.randn(B, C)).shape == (B, L)  # one token
    mean_head = ew.build_head("vit_layer", C, L, dropout=0.0, pool="mean").eval()
    mean_head.load_state_dict(head.state_dict())
    assert not torch.allclose(head(tokens), mean_head(tokens))  # CLS vs mean really differ


def test_vit_layer_mixes_tokens_before_classifying():
    # Unlike a linear exit on the CLS token, the output depends on the other tokens too.
    head = ew.build_head("vit_layer", C, L, dropout=0.0).eval()
    tokens = torch.randn(1, 5, C)
    other = tokens.clone()
    other[:, 1:] = torch.randn(1, 4, C)
    assert not torch.allclose(head(tokens), head(other))
    # ... but never on padding: masked keys are ignored, in both pooling modes
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    noisy = tokens.clone()
    noisy[:, 3:] = 100 * torch.randn(1, 2, C)
    for pool in ("token", "mean"):
        h = ew.build_head("vit_layer", C, L, dropout=0.0, pool=pool).eval()
        torch.testing.assert_close(h(tokens, mask), h(noisy, mask))
        torch.testing.assert_close(h(tokens, mask), h(tokens[:, :3]), atol=1e-6, rtol=0)


def test_vit_layer_gradients_reach_every_parameter():
    head = ew.build_head("vit_layer", C, L, dropout=0.0).train()
    maps = torch.randn(B, C, 3, 3, requires_grad=True)
    F.cross_entropy(head(maps), torch.tensor([0, 1, 4])).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert maps.grad.abs().sum() > 0


def test_vit_layer_flops_match_the_flop_counter():
    head = ew.build_head("vit_layer", 16, L).eval()
    for t in (1, 5, 17):
        mask = torch.ones(1, t, dtype=torch.long)
        assert float(head.head_flops(mask, 1)) == counted_flops(head, torch.randn(1, t, 16), mask)
    short_long = head.head_flops(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), 2)
    assert short_long[0] < short_long[1]


def test_vit_layer_options():
    assert [default_num_heads(w) for w in (16, 64, 192, 384, 768, 100)] == [1, 1, 3, 6, 12, 1]
    assert ew.build_head("vit_layer", 12, L, num_heads=4).num_heads == 4
    assert ew.build_head("vit_layer", 12, L, mlp_ratio=1.0).fc1.out_features == 12
    with pytest.raises(ConfigError, match="num_heads"):
        ew.build_head("vit_layer", 12, L, num_heads=5)
    with pytest.raises(ConfigError, match="pool"):
        ew.build_head("vit_layer", 12, L, pool="max")
    with pytest.raises(ConfigError, match="mlp_ratio"):
        ew.build_head("vit_layer", 12, L, mlp_ratio=0)


def test_vision_heads_on_an_encoder_backbone():
    """The heads are not vision-only: on BERT tokens they read the mask like any head."""
    from conftest import padded_batch, tiny_encoder

    batch = padded_batch((5, 3))
    for head in ("sdn", "vit_layer"):
        model = ew.attach_exits(tiny_encoder("bert"), head=head, num_labels=2, dropout=0.0).eval()
        res = model.early_exit(ew.get_policy("never"), **batch)
        torch.testing.assert_close(res.logits, model.full_depth(**batch), atol=1e-5, rtol=0)

"""FLOP counting (``exitwise.backbones.flop_count``): torch's formulas, plus the CPU kernel of
scaled_dot_product_attention, without torch's module tracker (which fails under no_grad on a
module fed a view of a parameter); and what heads on feature maps are charged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import exitwise as ew
from exitwise.backbones.flop_count import FlopCount


def test_attention_on_the_cpu_is_counted_by_hand():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    with torch.no_grad(), FlopCount() as counter:
        F.scaled_dot_product_attention(q, k, v)
    # scores and weighted sum: 2 rows x 3 heads x 10 x 10 pairs x 8 multiply-adds each
    assert counter.total == 2 * 2 * (2 * 3 * 10 * 10 * 8)
    # torch's own counter does not count the CPU kernel self-attention of this shape runs
    # (the reason for FlopCount)
    torch_counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch_counter:
        F.scaled_dot_product_attention(q, k, v)
    assert torch_counter.get_total_flops() == 0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_matches_torch_on_products_and_convolutions_in_every_mode(mode):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    reference = FlopCounterMode(display=False)
    with torch.no_grad(), reference:
        net(x)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "grad": torch.enable_grad}[mode]
    with context(), FlopCount() as counter:  # inference mode: aten.conv2d, decomposed
        net(x)
    assert counter.total == reference.get_total_flops() == 2 * (2 * 4 * 36 * 27) + 2 * 2 * 144 * 5


def test_a_view_of_a_parameter_fed_to_a_module_under_no_grad():
    """torch's counter fails here ("Expected gradient function to be set"), as on timm's
    attention pooling (global_pool="map"), which made such ViTs impossible to wrap."""

    class Latent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.latent = nn.Parameter(torch.randn(1, 2, 4))
            self.q = nn.Linear(4, 4)

        def forward(self, x):
            return self.q(self.latent.expand(x.shape[0], -1, -1))

    module, x = Latent(), torch.randn(3, 4)
    with pytest.raises(AssertionError), torch.no_grad(), FlopCounterMode(display=False):
        module(x)
    with torch.no_grad(), FlopCount() as counter:
        module(x)
    assert counter.total == 2 * 3 * 2 * 4 * 4


def test_timm_vit_with_attention_pooling_is_wrapped_and_its_attention_counted():
    timm = pytest.importorskip("timm")
    kw = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    pooled = timm.models.vision_transformer.VisionTransformer(global_pool="map", **kw).eval()
    model = ew.attach_exits(pooled, ew.ExitConfig(layers="all", head="linear"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.full_depth(pixel_values=x), pooled(x), atol=1e-5)
    # fused (CPU kernel) and unfused attention cost the same: 17 tokens, width 16
    fused = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    plain = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    for block in plain.blocks:
        block.attn.fused_attn = False
    counts = [ew.attach_exits(net, ew.ExitConfig(layers="all", head="linear")
                              ).backbone.block_flops()[1] for net in (fused, plain)]
    assert counts[0] == counts[1]
    assert counts[0][0] > 2 * 2 * 17 * 17 * 16  # the block includes its attention products


@pytest.mark.parametrize("head", ["vit_layer", "lgvit_local", "lgvit_global", "mean"])
def test_heads_on_feature_maps_are_charged_for_every_cell(head):
    """A head that works per position, on an 8 x 8 map of a CNN, is charged for 64 positions
    (it was charged for one)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 3, 8, 8))
    model = ew.attach_exits(backbone, ew.ExitConfig(layers=[1, 2], head=head, num_labels=3))
    res = model.early_exit(ew.get_policy("never"), pixel_values=torch.randn(2, 3, 8, 8))
    state = backbone.start(pixel_values=torch.randn(1, 3, 8, 8))
    blocks_flops = sum(float(backbone.layer_flops(i, state)[0]) for i in range(2))
    cells = torch.ones(1, 64, dtype=torch.long)
    expected = blocks_flops + sum(float(h.head_flops(cells, 1)[0]) for h in model.heads)
    assert res.flops.tolist() == pytest.approx([expected] * 2)
    one = blocks_flops + sum(float(h.head_flops(None, 1)[0]) for h in model.heads)
    assert expected > one
    if head == "vit_layer":  # 64 tokens: 64 x the per-token products + 64^2 attention pairs
        h = model.heads[0]
        per_token = h.linear_flops(h.qkv, h.proj, h.fc1, h.fc2)
        assert float(h.head_flops(cells, 1)[0]) == pytest.approx(
            64 * per_token + 64 * 64 * 4 * 8 + h.linear_flops(h.classifier))


@pytest.mark.parametrize("head", ["vit_layer", "mean", "lgvit_global"])
def test_a_headless_vit_prices_its_pooled_final_exit_as_the_runtime_runs_it(head):
    """The final head of a ViT without a classifier reads the pooled vector: the cost table
    priced it on every token (the mask right after the stem), the executor on one vector."""
    timm = pytest.importorskip("timm")
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0).eval()
    model = ew.attach_exits(net, ew.ExitConfig(layers="all", head=head, num_labels=3))
    res = model.early_exit(ew.get_policy("never"), pixel_values=torch.randn(3, 3, 16, 16))
    assert float(res.flops.sum()) == pytest.approx(res.executed_flops)
    state = model.backbone.start(pixel_values=torch.randn(1, 3, 16, 16))
    blocks = sum(float(model.backbone.layer_flops(i, state)[0]) for i in range(2))
    stem = float(model.backbone.start_flops(state)[0])
    tokens = torch.ones(1, 17, dtype=torch.long)
    expected = (stem + blocks + float(model.heads[0].head_flops(tokens, 1)[0])
                + float(model.heads[1].head_flops(None, 1)[0]))
    assert float(res.flops[0]) == pytest.approx(expected)


def test_pytorchs_fused_transformer_layers_are_counted_by_hand():
    """In eval mode without gradients nn.TransformerEncoderLayer and nn.MultiheadAttention
    run fused kernels that torch's counter has no formula for: a SequentialBackbone of them
    profiled 0 FLOPs per block."""
    torch.manual_seed(0)
    b, length, e, f = 2, 5, 16, 24
    layer = nn.TransformerEncoderLayer(e, 2, f, batch_first=True).eval()
    mha = nn.MultiheadAttention(e, 2, batch_first=True).eval()
    x = torch.randn(b, length, e)
    attention = 2 * b * length * e * (3 * e + e) + 2 * 2 * b * length * length * e
    for call, expected in ((lambda: layer(x), attention + 2 * 2 * b * length * e * f),
                           (lambda: mha(x, x, x, need_weights=False), attention)):
        with torch.no_grad(), FlopCount() as fused:
            call()
        with torch.enable_grad(), FlopCount() as unfused:  # the slow path, op by op
            call()
        assert fused.total == unfused.total == expected
    backbone = ew.SequentialBackbone([layer, layer], example=x[:1])
    state = backbone.start(inputs=x[:1])
    per_row = attention / b + 2 * 2 * length * e * f  # one row: attention, feed-forward
    assert float(backbone.layer_flops(0, state)[0]) == per_row

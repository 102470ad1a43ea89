"""Exit placement by FLOPs fraction (SDN): the chosen blocks, the ``flops:`` layers spec, and
bad fractions."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, tiny_encoder
from helpers.vision import SIZE, tiny_vision
from torch import nn

import exitwise as ew
from exitwise.backbones import SequentialBackbone, VisionBackbone
from exitwise.backbones.placement import (
    SDN_FRACTIONS,
    cumulative_flops,
    layers_at_flops_fractions,
)
from exitwise.errors import ConfigError

pytest.importorskip("timm")


@pytest.mark.parametrize("family", ["tv-resnet", "tv-mobilenet_v2", "timm-convnext"])
def test_depths_are_where_cumulative_flops_first_reach_each_fraction(family):
    bb = VisionBackbone(tiny_vision(family), image_size=SIZE)
    depths = layers_at_flops_fractions(bb)
    stem, blocks = bb.block_flops()
    cum = torch.tensor([stem] + blocks, dtype=torch.float64).cumsum(0)  # cum[d]: after block d
    total = float(cum[-1])
    assert torch.equal(cumulative_flops(bb), cum)
    expected = set()
    for f in SDN_FRACTIONS:
        d = next(d for d in range(1, bb.num_layers + 1) if cum[d] >= f * total)
        assert d == 1 or cum[d - 1] < f * total  # the *first* block that reaches f
        expected.add(d)
    assert depths == sorted(expected)
    assert depths == sorted(set(depths)) and 1 <= depths[0] and depths[-1] <= bb.num_layers


def test_placement_follows_compute_not_block_count():
    # MobileNetV2's blocks differ a lot in cost: FLOPs placement is not an even spacing.
    bb = VisionBackbone(tiny_vision("tv-mobilenet_v2"), image_size=SIZE)
    depths = layers_at_flops_fractions(bb, (0.25, 0.5, 0.75))
    even = [round(f * bb.num_layers) for f in (0.25, 0.5, 0.75)]
    assert depths != even
    assert layers_at_flops_fractions(bb, (1.0,)) == [bb.num_layers]
    # two fractions landing on the same block give one depth
    assert layers_at_flops_fractions(bb, (0.5, 0.5000001)) == layers_at_flops_fractions(bb, (0.5,))


def test_layers_spec_in_exit_config():
    bb = VisionBackbone(tiny_vision("tv-resnet"), image_size=SIZE)
    model = ew.attach_exits(bb, ew.ExitConfig(layers="flops:0.15,0.3,0.45,0.6,0.75,0.9",
                                              head="sdn", num_labels=3))
    placed = layers_at_flops_fractions(bb)
    assert model.exit_layers == sorted(set(placed + [bb.num_layers]))
    assert model.config.to_dict()["layers"] == "flops:0.15,0.3,0.45,0.6,0.75,0.9"  # JSON-able


def test_other_backbones_with_an_example():
    torch.manual_seed(0)
    seq = SequentialBackbone([nn.Linear(4, 64), nn.Linear(64, 4), nn.Linear(4, 4)])
    # FLOPs 512, 512, 32 (of 1056): 45% is reached in block 1, 95% in block 2
    fractions = (0.45, 0.95, 1.0)
    assert layers_at_flops_fractions(seq, fractions, example=torch.randn(1, 4)) == [1, 2, 3]
    encoder = ew.wrap_backbone(tiny_encoder("bert"))
    batch = padded_batch((6, 6))
    assert layers_at_flops_fractions(encoder, (0.25, 0.5, 1.0), example=batch) == [1, 2, 4]


@pytest.mark.parametrize("bad", [(0.0,), (1.5,), (-0.1, 0.5), (), ("0.3",), (True,)])
def test_fractions_outside_unit_interval(bad):
    bb = VisionBackbone(tiny_vision("timm-convnext"), image_size=SIZE)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        layers_at_flops_fractions(bb, bad)


@pytest.mark.parametrize("spec", ["flops:0,0.5", "flops:1.2", "flops:", "flops:a,b"])
def test_bad_flops_specs(spec):
    bb = VisionBackbone(tiny_vision("timm-convnext"), image_size=SIZE)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        ew.attach_exits(bb, layers=spec, num_labels=2)


def test_flops_spec_needs_a_backbone_and_an_example():
    with pytest.raises(ConfigError, match="needs the backbone"):
        ew.ExitConfig(layers="flops:0.5").resolve_layers(4)
    # a sequential network that has seen no input has no example to measure with
    unseen = ew.SequentialBackbone([nn.Linear(4, 4), nn.Linear(4, 4)])
    with pytest.raises(ConfigError, match="example="):
        layers_at_flops_fractions(unseen, (0.5,))
    # an encoder makes its own (equal blocks: 0.5 of the FLOPs after block 2 of 4)
    assert layers_at_flops_fractions(ew.wrap_backbone(tiny_encoder("bert")), (0.5,)) == [2]


def test_placing_exits_by_flops_leaves_a_train_mode_model_unchanged():
    # timm and torchvision hand out models in train mode; the example pass that measures the
    # FLOPs must not fold a blank image into their BatchNorm statistics (nor change modes)
    net = tiny_vision("tv-resnet")
    net.train()
    net.layer1.eval()  # a part the user keeps in eval mode stays so
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {name: m.training for name, m in net.named_modules()}
    model = ew.attach_exits(net, ew.ExitConfig(layers="flops:0.3,0.6", head="sdn",
                                               num_labels=3))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert len(model.exit_layers) >= 2


def test_sequential_backbone_places_exits_by_flops_from_its_example():
    blocks = [nn.Linear(4, 64), nn.Linear(64, 4), nn.Linear(4, 4)]
    with pytest.raises(ConfigError, match="example="):
        ew.attach_exits(SequentialBackbone(blocks), ew.ExitConfig(
            layers="flops:0.45,0.95", head="linear", num_labels=2))
    seq = SequentialBackbone(blocks, example=torch.randn(5, 4))
    # FLOPs 512, 512, 32 (of 1056), as above: 45% in block 1, 95% in block 2
    model = ew.attach_exits(seq, ew.ExitConfig(layers="flops:0.45,0.95", head="linear",
                                               num_labels=2))
    assert model.exit_layers == [1, 2, 3]
    assert seq.example_input(3).shape == (3, 4)

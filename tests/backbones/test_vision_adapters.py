"""Vision adapters: block order against the libraries' own intermediates, adapter choice,
per-resolution FLOPs, side-effect-free profiling, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder
from helpers.vision import SIZE, images, tiny_vision
from torch import nn

import exitwise as ew
from exitwise.backbones import (
    HFEncoderBackbone,
    SequentialBackbone,
    VisionBackbone,
    wrap_backbone,
)
from exitwise.errors import InputError, UnsupportedModelError

timm = pytest.importorskip("timm")


def block_outputs(backbone: VisionBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        state = backbone.start(pixel_values=x)
        outs = []
        for i in range(backbone.num_layers):
            state = backbone.step(i, state)
            outs.append(state.hidden)
    return outs


@pytest.mark.parametrize(
    "family, stage_ends",
    [("timm-resnet", [1, 2, 3]), ("timm-convnext", [1, 3, 4])],  # ConvNeXt depths (1, 2, 1, 1)
)
def test_cnn_stage_ends_match_timm_intermediates(family, stage_ends):
    """The output after each stage's last block is timm's own per-stage feature."""
    model = tiny_vision(family)
    bb = VisionBackbone(model, image_size=SIZE)
    x = images(2)
    ours = block_outputs(bb, x)
    with torch.no_grad():
        theirs = model.forward_intermediates(x, intermediates_only=True)
    theirs = theirs[-4:]  # ResNet also returns the stem first
    for k, depth in enumerate(stage_ends):
        torch.testing.assert_close(ours[depth - 1], theirs[k], atol=1e-6, rtol=0)
    assert bb.num_layers == stage_ends[-1] + 1


def test_vit_blocks_match_timm_intermediates():
    model = tiny_vision("timm-vit")
    bb = VisionBackbone(model)  # size from the model itself (img_size=32)
    assert bb.default_size == (SIZE, SIZE) and bb.num_layers == len(model.blocks)
    x = images(2)
    ours = block_outputs(bb, x)
    with torch.no_grad():
        theirs = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    for mine, own in zip(ours[:-1], theirs[:-1]):
        torch.testing.assert_close(mine[:, model.num_prefix_tokens :], own, atol=1e-6, rtol=0)
    assert ours[0].shape == (2, 17, 192)  # CLS + 4x4 patches
    assert ours[-1].shape == (2, 192)  # final norm + CLS pooling: pre-logits


def test_token_models_carry_a_mask_and_cnns_do_not():
    vit = VisionBackbone(tiny_vision("timm-vit"))
    state = vit.start(pixel_values=images(2))
    assert state.mask is not None and state.mask.shape == (2, 17) and bool(state.mask.all())
    cnn = VisionBackbone(tiny_vision("timm-resnet"), image_size=SIZE)
    assert cnn.start(pixel_values=images(2)).mask is None


def test_wrap_backbone_picks_the_right_adapter():
    assert isinstance(wrap_backbone(tiny_vision("timm-resnet")), VisionBackbone)
    assert isinstance(wrap_backbone(tiny_vision("hf-vit")), VisionBackbone)
    assert isinstance(wrap_backbone(tiny_vision("tv-mobilenet_v3")), VisionBackbone)
    assert isinstance(wrap_backbone(tiny_encoder("bert")), HFEncoderBackbone)
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert isinstance(wrap_backbone(seq), SequentialBackbone)
    # attach_exits on a raw model profiles at the model's own input size (timm's pretrained_cfg)
    raw = tiny_vision("timm-resnet")
    model = ew.attach_exits(raw, head="sdn", num_labels=3)
    assert model.backbone.default_size == tuple(raw.pretrained_cfg["input_size"][1:])
    assert [model.backbone.feature_dim(d) for d in model.exit_layers] == [64, 128, 256, 512]


def test_flops_are_measured_per_resolution_and_cached():
    bb = VisionBackbone(tiny_vision("tv-resnet"), image_size=SIZE)
    stem32, blocks32 = bb.block_flops()
    stem64, blocks64 = bb.block_flops(64)
    assert all(f > 0 for f in blocks32)
    # convolutions scale with the number of pixels: 4x the pixels, ~4x the FLOPs
    assert sum(blocks64) == pytest.approx(4 * sum(blocks32), rel=0.02)
    model = ew.attach_exits(bb, head="linear", num_labels=3, layers=[2, 5]).eval()
    small = model.early_exit(ew.get_policy("never"), pixel_values=images(2))
    large = model.early_exit(ew.get_policy("never"), pixel_values=images(2, size=64))
    assert float(large.flops[0]) > 3.5 * float(small.flops[0])
    assert set(bb._profiles) == {(32, 32), (64, 64)}  # measured once per size


def test_profiling_changes_no_module_state():
    model = tiny_vision("timm-resnet").train()
    model.bn1.eval()  # a user's frozen BatchNorm stays frozen, the rest stays in training
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    bb = VisionBackbone(model, image_size=SIZE)
    bb.block_flops(48)
    assert model.training and not model.bn1.training and model.layer1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k  # no BatchNorm statistics were updated


def test_gradients_reach_backbone_and_heads():
    model = ew.attach_exits(VisionBackbone(tiny_vision("timm-vit")), head="vit_layer",
                            final_head="linear", num_labels=3, layers=[2]).train()
    loss = sum(torch.nn.functional.cross_entropy(lg, torch.tensor([0, 2]))
               for lg in model(pixel_values=images(2)).logits)
    loss.backward()
    assert model.backbone.net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.heads.parameters())


@pytest.mark.parametrize("family", ["timm-resnet", "timm-vit", "tv-mobilenet_v2", "hf-vit"])
def test_wrong_channel_count(family):
    bb = VisionBackbone(tiny_vision(family), image_size=SIZE)
    with pytest.raises(InputError, match="1 channels but the model takes 3"):
        bb.start(pixel_values=torch.randn(2, 1, SIZE, SIZE))
    with pytest.raises(InputError, match="1 channels"):
        bb.reference(pixel_values=torch.randn(2, 1, SIZE, SIZE))


@pytest.mark.parametrize(
    "family, size, match",
    [
        ("timm-vit", 48, "takes 32x32 images only"),
        ("hf-vit", 40, "takes 32x32 images"),
        ("timm-convnext", 16, "cannot take 16x16 images"),  # too small for 4 downsamplings
    ],
)
def test_image_size_the_model_cannot_take(family, size, match):
    model = ew.attach_exits(VisionBackbone(tiny_vision(family), image_size=SIZE),
                            num_labels=2, head="linear")
    with pytest.raises(InputError, match=match):
        model.early_exit(ew.get_policy("never"), pixel_values=torch.randn(2, 3, size, size))
    with pytest.raises(InputError, match=match):
        model.full_depth(pixel_values=torch.randn(2, 3, size, size))


def test_dynamic_size_vit_checks_patch_divisibility():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE,
                              patch_size=8, depth=2, num_classes=2, dynamic_img_size=True)
    bb = VisionBackbone(model)
    assert bb.start(pixel_values=torch.randn(1, 3, 48, 40)).hidden.shape == (1, 1 + 6 * 5, 192)
    with pytest.raises(InputError, match="divisible by the patch size 8x8"):
        bb.start(pixel_values=torch.randn(1, 3, 36, 40))


def test_malformed_batches():
    bb = VisionBackbone(tiny_vision("timm-resnet"), image_size=SIZE)
    with pytest.raises(InputError, match="empty"):
        bb.start(pixel_values=torch.randn(0, 3, SIZE, SIZE))
    with pytest.raises(InputError, match=r"\(batch, channels, height, width\)"):
        bb.start(pixel_values=torch.randn(3, SIZE, SIZE))
    with pytest.raises(InputError, match="float"):
        bb.start(pixel_values=torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(InputError, match="pixel_values"):
        bb.start()
    with pytest.raises(InputError, match="unexpected inputs"):
        bb.start(pixel_values=images(1), attention_mask=torch.ones(1, 4))


def test_unknown_models_and_models_without_blocks():
    class Tiny(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedModelError, match="timm.models.resnet.ResNet"):
        VisionBackbone(Tiny())
    with pytest.raises(UnsupportedModelError, match="vision model"):
        wrap_backbone(nn.Linear(3, 3))
    vit = tiny_vision("timm-vit")
    vit.blocks = nn.Sequential()  # a model with no intermediate blocks to exit after
    with pytest.raises(UnsupportedModelError, match="no blocks"):
        VisionBackbone(vit)
    resnet = tiny_vision("timm-resnet")
    del resnet.layer4  # a layout path the model does not have
    with pytest.raises(UnsupportedModelError, match="layer4"):
        VisionBackbone(resnet)


def test_distilled_deit_says_its_two_classifiers_cannot_be_kept():
    # timm's distilled DeiT averages a class-token head and a distillation-token head: no
    # classifier over one pre-logits vector reproduces that, so attach_exits says so instead
    # of silently making a fresh 2-class final exit; reset, it is a headless backbone
    import timm

    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5,
                            img_size=SIZE, patch_size=8, depth=2).eval()
    with pytest.raises(UnsupportedModelError, match="reset_classifier"):
        ew.attach_exits(net, layers="all", head="linear")
    net.reset_classifier(0)
    model = ew.attach_exits(net, layers="all", head="linear", num_labels=5).eval()
    assert type(model.heads[-1]).registered_name == "linear"
    assert model.early_exit(ew.get_policy("never"), pixel_values=images(2)).logits.shape == (2, 5)

"""Tiny random vision models of every family in the layout table (no weights, no network),
and random images; 3x32x32 inputs, 10 classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

SIZE, CLASSES = 32, 10
FAMILIES = ["timm-resnet", "timm-vit", "timm-convnext", "tv-resnet", "tv-mobilenet_v2",
            "tv-mobilenet_v3", "hf-vit"]


def tiny_vision(family: str, seed: int = 0) -> nn.Module:
    """A small random vision model of ``family`` (eval mode) that takes 3x32x32 images."""
    torch.manual_seed(seed)
    if family == "timm-resnet":
        model = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)
    elif family == "timm-vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE,
                                  patch_size=8, num_classes=CLASSES, depth=4)
    elif family == "timm-convnext":
        from timm.models.convnext import ConvNeXt

        model = ConvNeXt(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=CLASSES)
    elif family == "tv-resnet":
        model = torchvision.models.resnet18(num_classes=CLASSES)
    elif family == "tv-mobilenet_v2":
        model = torchvision.models.mobilenet_v2(num_classes=CLASSES, width_mult=0.25)
    elif family == "tv-mobilenet_v3":
        model = torchvision.models.mobilenet_v3_small(num_classes=CLASSES)
    elif family == "hf-vit":
        import transformers as tf

        config = tf.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                              intermediate_size=64, image_size=SIZE, patch_size=8,
                              num_labels=CLASSES)
        model = tf.ViTForImageClassification(config)
    else:  # pragma: no cover
        raise ValueError(family)
    return model.eval()


def images(n: int = 7, seed: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

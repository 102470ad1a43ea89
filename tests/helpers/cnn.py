"""A tiny 4-block CNN with SDN exits and its cached exit logits, and a by-hand read of every
exit's features: shared by the policy, head and recipe tests."""

from __future__ import annotations

import torch
from torch import nn

import exitwise as ew
from exitwise.analysis import collect_exit_logits


def sdn_cnn_with_cache():
    """(model, images (48, 3, 8, 8), cache of all exits' logits on them with 4-class labels);
    the heads' classifiers are scaled up so that confidences spread over (0, 1)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1), nn.ReLU())
              for i in range(4)]
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 3, 8, 8))
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="sdn", num_labels=4,
                                                    dropout=0.0, head_kwargs={"pool_size": 2}))
    with torch.no_grad():
        for h in model.heads:
            h.classifier.weight.mul_(8.0)
    model.eval()
    x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (48,), generator=torch.Generator().manual_seed(2))
    return model, x, collect_exit_logits(model, [(x, y)], progress=False)


def block_features(model, x):
    """Every exit's features, read by running the backbone by hand."""
    state = model.backbone.start(pixel_values=x)
    feats = []
    for i in range(model.backbone.num_layers):
        state = model.backbone.step(i, state)
        if i + 1 in model.exit_lookup:
            feats.append(model.backbone.features(state))
    return feats

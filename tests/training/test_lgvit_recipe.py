"""LGViT's two-stage recipe on a tiny random timm ViT with heterogeneous exits (local heads
shallow, global heads deep): the alternating first stage, the prediction and feature
distillation of the second against hand-computed values, the frozen backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.trainkit import FAST, StageRecorder

import exitwise as ew
from exitwise.outputs import ExitOutputs
from exitwise.training import TrainingProgress, get_strategy, train
from exitwise.training.lgvit import (
    AlternatingWeightedLoss,
    hete_loss,
    homo_loss,
    prediction_distillation,
)

timm = pytest.importorskip("timm")


def tiny_vit_model() -> ew.MultiExitModel:
    from exitwise.backbones import VisionBackbone

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                            num_classes=3, depth=4, embed_dim=16, num_heads=2)
    heads = {1: "lgvit_local", 2: "lgvit_local", 3: "lgvit_global", 4: "linear"}
    return ew.attach_exits(VisionBackbone(vit.eval()),
                           ew.ExitConfig(layers="all", head=heads, num_labels=3, dropout=0.0))


def vit_items(n: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        x = torch.randn(3, 16, 16, generator=g) * 0.5
        x[i % 3] += 1.0  # the class is the brightest colour channel
        items.append({"pixel_values": x, "labels": i % 3})
    return items


def test_stage_one_alternates_final_only_and_depth_weighted_steps():
    progress = TrainingProgress()
    loss = AlternatingWeightedLoss([1, 2, 4], progress)
    z = [torch.randn(4, 3) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    out = ExitOutputs(logits=z)
    ce = [F.cross_entropy(x, y) for x in z]
    weighted = (1 * ce[0] + 2 * ce[1] + 4 * ce[2]) / 7
    torch.testing.assert_close(loss(out, y), weighted)  # outside training
    progress.num_epochs = 1
    progress.step = 0  # even optimizer steps: the final exit alone
    torch.testing.assert_close(loss(out, y), ce[2])
    progress.step = 3
    torch.testing.assert_close(loss(out, y), weighted)


def test_prediction_distillation_by_hand():
    z = [torch.randn(4, 3) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    t = F.log_softmax(z[2] / 2, -1)
    expected = 0.0
    for k in (0, 1):  # (1 - 0.3) CE + 0.3 T^2 sum-KL / (B C), T = 2, as the reference
        s = F.log_softmax(z[k] / 2, -1)
        kl = (t.exp() * (t - s)).sum() * 4 / 12
        expected = expected + 0.7 * F.cross_entropy(z[k], y) + 0.3 * kl
    out = prediction_distillation(0.3, 2.0)(ExitOutputs(logits=z), y)
    torch.testing.assert_close(out, expected)


def test_feature_losses_by_hand():
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    pt, ps = t.softmax(-1), s.log_softmax(-1)
    kl = (pt * (pt.log() - ps)).sum(-1)  # per token, over the channels
    torch.testing.assert_close(hete_loss(s, t, keep), (kl * keep).sum() / 2)
    full = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(homo_loss(s, t, full, full, inner=False), F.mse_loss(s, t))
    gram = F.mse_loss(s.transpose(1, 2) @ s, t.transpose(1, 2) @ t)
    torch.testing.assert_close(homo_loss(s, t, full, full, inner=True), gram)


def test_lgvit_trains_end_to_end_then_distils_with_the_backbone_frozen(tmp_path):
    model = tiny_vit_model()
    recipe = get_strategy("lgvit")
    s1, s2 = recipe.stages(model)
    assert any(n.startswith("backbone.") for n in s1.trainable_names(model))
    assert {n.split(".")[1] for n in s2.trainable_names(model)} == {"0", "1", "2"}
    # the step's loss adds the feature terms to the prediction distillation
    from exitwise.training import PaddingCollator

    batch = PaddingCollator()(vit_items(6))
    labels = batch.pop("labels")
    loss, out = s2.step(model, batch, labels)
    assert len(out.logits) == 4
    plain = s2.loss(out, labels)
    assert float(loss.detach()) > float(plain.detach())
    no_features = get_strategy("lgvit", homo_weight=0.0, hete_weight=0.0).stages(model)[1]
    torch.testing.assert_close(no_features.step(model, batch, labels)[0], plain)
    recorder = StageRecorder()
    train(model, vit_items(), strategy=recipe, output_dir=tmp_path, max_steps=3,
          save_final=False, callbacks=[recorder], **{**FAST, "per_device_train_batch_size": 8})
    b2, a2 = recorder.before["stage-2"], recorder.after["stage-2"]
    frozen = [n for n in b2 if n.startswith(("backbone.", "heads.3."))]
    assert frozen and all(torch.equal(b2[n], a2[n]) for n in frozen)
    moved = [n for n in b2 if n.startswith("heads.0.") and not torch.equal(b2[n], a2[n])]
    assert moved

"""Each vision recipe's defining rule against values computed by hand on a tiny CNN: BYOT's
distillation term and total loss, IMTA's two stages and its collaboration head, BoostNet's
reweighted sums at inference, ZTW's cascade and ensemble over the internal classifiers, SDN's
pooling head, CopycatSL-ViT's targets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.cnn import block_features
from helpers.trainkit import FAST, StageRecorder
from test_cv_recipes import cnn, image_items

import exitwise as ew
from exitwise.training import get_strategy, train
from exitwise.training.base import soft_cross_entropy
from exitwise.training.imta import kd_term

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))
Y = torch.tensor([0, 1, 2, 0, 1])


# -- BYOT ------------------------------------------------------------------------------------
def test_byot_distillation_is_a_soft_cross_entropy_without_t_squared():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 3.0, 0.0]])
    ps = [math.exp(v / 3) for v in (1.0, 0.0, -1.0)]
    pt = [math.exp(v / 3) for v in (0.0, 3.0, 0.0)]
    log_qs = [math.log(v / sum(ps)) for v in ps]
    expected = -sum(p / sum(pt) * lq for p, lq in zip(pt, log_qs))  # no factor 9
    assert float(soft_cross_entropy(s, t, 3.0)) == pytest.approx(expected, rel=1e-6)


def test_byot_total_loss_by_hand():
    model = cnn("linear").train()
    (stage,) = get_strategy("self_distill", alpha=0.3, temperature=3.0,
                            hint_weight=0.03).stages(model)
    out = model(pixel_values=X, return_features=True)
    z, f = out.logits, out.features
    a = model.self_distill_adapters.layers["0"]
    expected = F.cross_entropy(z[2], Y)
    for k in (0, 1):  # every shallow exit: 0.7 CE + 0.3 SoftCE_3 (the reference's weights)
        teacher = F.softmax(z[2].detach() / 3, -1)
        soft = -(teacher * F.log_softmax(z[k] / 3, -1)).sum(-1).mean()
        expected = expected + 0.7 * F.cross_entropy(z[k], Y) + 0.3 * soft
    expected = expected + 0.03 * torch.linalg.norm(a(f[0]) - f[2].detach())  # exit 1: no hint
    torch.testing.assert_close(stage.loss(out, Y), expected)


def test_byot_adaptation_layers_train_with_the_recipe(tmp_path):
    model = cnn("linear")
    recorder = StageRecorder()
    train(model, image_items(64), strategy="self_distill", output_dir=tmp_path, max_steps=3,
          save_final=False, callbacks=[recorder], **FAST)
    before, after = recorder.before["stage-1"], recorder.after["stage-1"]
    key = "self_distill_adapters.layers.0.weight"
    assert key in before and not torch.equal(before[key], after[key])
    # training-time only: the saved heads do not carry them
    model.save_pretrained(tmp_path / "saved")
    loaded = ew.MultiExitModel.from_pretrained(tmp_path / "saved", backbone=model.backbone)
    assert not hasattr(loaded, "self_distill_adapters")


# -- IMTA ------------------------------------------------------------------------------------
def imta_model():
    return cnn("cascade", {"base": "linear", "combine": "isc", "detach_previous": False})


def test_isc_head_maps_previous_logits_through_linear_bn_relu():
    model = imta_model().eval()
    head = model.heads[1]
    with torch.no_grad():
        head.previous.weight.normal_()
        bn = head.isc[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    hidden, prev = torch.randn(5, 8, 4, 4), torch.randn(5, 3)  # exit 1 reads 8 channels
    lin = head.isc[0]
    isc = torch.relu((prev @ lin.weight.T + lin.bias - bn.running_mean)
                     / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    assert isc.shape == (5, 8)  # D = the base classifier's input width (8 channels here)
    expected = head.base(hidden) + isc @ head.previous.weight.T
    torch.testing.assert_close(head(hidden, previous_logits=prev), expected)
    torch.testing.assert_close(model.heads[0](hidden[:, :6]), model.heads[0].base(hidden[:, :6]))


def test_imta_stage_one_is_ge_without_links_stage_two_distils_the_frozen_final_exit():
    model = imta_model().train()
    s1, s2 = get_strategy("imta").stages(model)
    n1, n2 = s1.trainable_names(model), s2.trainable_names(model)
    assert any(n.startswith("backbone.") for n in n1)
    assert not any(".isc." in n or ".previous." in n for n in n1)
    assert not any(n.startswith("backbone.") for n in n2)
    assert "heads.2.base.classifier.weight" not in n2  # the teacher stays frozen
    assert {"heads.0.base.classifier.weight", "heads.1.base.classifier.weight",
            "heads.1.isc.0.weight", "heads.2.previous.weight"} <= n2
    assert s1.forward_kwargs["grad_scales"] == [(1 / 3, 2 / 3), (1 / 2, 1 / 2), (1.0, 0.0)]
    with torch.no_grad():
        for h in model.heads[1:]:
            h.previous.weight.normal_()
    out = model(pixel_values=X, **s2.forward_kwargs)
    teacher = model.heads[2].base.classifier(out.features[2])  # final exit without its link
    z = out.logits
    expected = F.cross_entropy(z[2], Y)
    for k in (0, 1):  # gamma = 0.9, T = 3, KL summed over classes, / (B * C) as nn.KLDivLoss()
        p_t = F.softmax(teacher.detach() / 3, -1)
        kl = (p_t * (p_t.log() - F.log_softmax(z[k] / 3, -1))).sum() / z[k].numel() * 9
        expected = expected + 0.1 * F.cross_entropy(z[k], Y) + 0.9 * kl
    torch.testing.assert_close(s2.loss(out, Y), expected)
    batchmean = kd_term(z[0], teacher, 3.0, "batchmean")
    torch.testing.assert_close(batchmean, kd_term(z[0], teacher, 3.0, "mean") * 3)  # C = 3


def test_imta_trains_both_stages_and_keeps_the_network_in_stage_two(tmp_path):
    model = imta_model()
    recorder = StageRecorder()
    train(model, image_items(64), strategy="imta", output_dir=tmp_path, max_steps=3,
          save_final=False, callbacks=[recorder], **FAST)
    b2, a2 = recorder.before["stage-2"], recorder.after["stage-2"]
    frozen = [n for n in b2 if n.startswith(("backbone.", "heads.2.base."))]
    assert frozen and all(torch.equal(b2[n], a2[n]) for n in frozen)
    assert not torch.equal(b2["heads.1.previous.weight"], a2["heads.1.previous.weight"])


# -- BoostNet --------------------------------------------------------------------------------
def test_boostnet_reweights_the_previous_prediction_at_inference():
    model = cnn("cascade", {"base": "linear", "combine": "additive", "reweight": 0.5}).eval()
    with torch.no_grad():
        out = model(pixel_values=X).logits
        own = [model.heads[k].base(h) for k, (h, _) in enumerate(block_features(model, X))]
    torch.testing.assert_close(out[0], own[0])
    torch.testing.assert_close(out[1], own[1] + 0.5 * own[0])
    torch.testing.assert_close(out[2], own[2] + 0.5 * own[1] + 0.25 * own[0])
    live = model.early_exit(ew.get_policy("never"), pixel_values=X)  # the executor computes the same
    torch.testing.assert_close(live.logits, out[2], atol=1e-5, rtol=1e-5)


def test_boostnet_loss_with_plain_heads_forms_the_reweighted_sums():
    model = cnn("linear")
    with pytest.warns(UserWarning, match="residual alone"):
        (stage,) = get_strategy("boosted", reweight=0.5, gradient_rescaling=False).stages(model)
    out = model(pixel_values=X)
    f = out.logits
    big_f1 = f[1] + 0.5 * f[0].detach()
    expected = (F.cross_entropy(f[0], Y) + F.cross_entropy(big_f1, Y)
                + F.cross_entropy(f[2] + 0.5 * big_f1.detach(), Y))
    torch.testing.assert_close(stage.loss(out, Y), expected)


# -- ZTW -------------------------------------------------------------------------------------
def test_ztw_cascade_is_one_linear_layer_over_features_and_layernormed_logits():
    model = cnn("cascade", {"base": "linear"}, final_head="mean").eval()
    head = model.heads[1]
    with torch.no_grad():
        head.previous.weight.normal_()
        head.norm.weight.uniform_(0.5, 1.5)
        head.norm.bias.normal_()
    hidden, prev = torch.randn(5, 8, 4, 4), torch.randn(5, 3)  # exit 1 reads 8 channels
    ln = (prev - prev.mean(-1, keepdim=True)) / torch.sqrt(
        prev.var(-1, unbiased=False, keepdim=True) + head.norm.eps)
    ln = ln * head.norm.weight + head.norm.bias
    pooled = hidden.mean((2, 3))
    w = torch.cat([head.base.classifier.weight, head.previous.weight], 1)  # [W_f | W_prev]
    expected = torch.cat([pooled, ln], 1) @ w.T + head.base.classifier.bias
    torch.testing.assert_close(head(hidden, previous_logits=prev), expected)
    torch.testing.assert_close(head(hidden), head.base(hidden))  # first exit: no prior
    assert model.heads[2].registered_name == "mean"  # the network's own final head


def test_ztw_ensemble_covers_the_internal_classifiers_only():
    model = cnn("cascade", final_head="mean")
    ens = model.attach_ensemble()
    assert ens.num_members == model.num_exits - 1
    with torch.no_grad():
        ens.raw_weight.normal_()
        ens.bias.normal_()
    z = [torch.randn(5, 3), torch.randn(5, 3)]
    q = ens(z)
    a, logp = ens.raw_weight, [x.log_softmax(-1) for x in z]
    # the reference: mean over the ICs so far of exp(a_kj) * log p_j, plus a per-class bias
    torch.testing.assert_close(q[:, 0], a[0, 0].exp() * logp[0] + ens.bias[0])
    torch.testing.assert_close(
        q[:, 1], (a[1, 0].exp() * logp[0] + a[1, 1].exp() * logp[1]) / 2 + ens.bias[1])
    policy = ew.get_policy("ztw", threshold=0.5, **ens.to_dict())
    final = torch.randn(5, 3)
    out = policy.output_logits(2, 3, final, {"logp": torch.stack(logp, 1)})
    torch.testing.assert_close(out, final.log_softmax(-1))  # the final exit keeps its own


# -- SDN -------------------------------------------------------------------------------------
def test_sdn_mix_is_free_and_the_head_has_no_dropout():
    torch.manual_seed(3)
    expected_alpha = float(torch.rand(1))
    torch.manual_seed(3)
    head = ew.build_head("sdn", 4, 3, dropout=0.5).train()
    assert float(head.mix.detach()) == pytest.approx(expected_alpha)  # torch.rand(1), as SDN's code
    maps = torch.randn(2, 4, 8, 8)
    assert torch.equal(head(maps), head(maps))  # no dropout even in training mode
    with torch.no_grad():
        head.mix.fill_(1.7)  # unconstrained: no squashing into [0, 1]
    peak, mean = F.adaptive_max_pool2d(maps, 4), F.adaptive_avg_pool2d(maps, 4)
    torch.testing.assert_close(head.pooled(maps), (1.7 * peak - 0.7 * mean).flatten(1))


# -- CopycatSL-ViT ---------------------------------------------------------------------------
def test_copycat_trains_exits_on_the_final_exits_predictions():
    model = cnn("vit_layer")
    s1, s2 = get_strategy("copycat_sl_vit").stages(model)
    for s in (s1, s2):
        names = s.trainable_names(model)
        assert {n.split(".")[1] for n in names} == {"0", "1"}  # backbone and final: frozen
    out = model(pixel_values=X)
    z = out.logits
    fake = z[2].argmax(-1)
    torch.testing.assert_close(
        s2.loss(out, Y), F.cross_entropy(z[0], fake) + F.cross_entropy(z[1], fake))
    torch.testing.assert_close(s1.loss(out, Y), F.cross_entropy(z[0], Y) + F.cross_entropy(z[1], Y))
    (soft,) = get_strategy("copycat_sl_vit", targets="soft", pretrain_exits=False).stages(model)
    p = z[2].softmax(-1)
    expected = sum(-(p * z[k].log_softmax(-1)).sum(-1).mean() for k in (0, 1))
    torch.testing.assert_close(soft.loss(out, Y), expected)

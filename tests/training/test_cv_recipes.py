"""The computer-vision training recipes on a tiny CNN with random, learnable data.

Each recipe runs a few steps through the real ``train`` loop and lowers its own objective;
the mechanisms they rest on are checked numerically (gradient equilibrium's rescaled backbone
gradients, SDN's ramp, ZTW's stored ensemble, the meta steps really updating their
meta-parameters, BYOT's feature hints).
"""

from __future__ import annotations

import pytest
import torch
from helpers.trainkit import FAST
from torch import nn

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.training import (
    PaddingCollator,
    TrainingProgress,
    get_strategy,
    gradient_equilibrium_scales,
    train,
    ztw_ensemble_weights,
)
from exitwise.training.meta import budget_assignment
from exitwise.training.sdn import RampedExitLoss

CNN_HEADS = {  # the head each recipe is meant for
    "branchynet": ("sdn", {}),
    "sdn_ramp": ("sdn", {}),
    "sdn_ic_only": ("sdn", {}),
    "imta": ("cascade", {"base": "sdn", "combine": "isc", "detach_previous": False}),
    "self_distill": ("sdn", {}),  # widths differ (6, 8, 8): the adaptation layers map them
    "ztw": ("cascade", {"base": "sdn"}),
    "boosted": ("cascade", {"base": "sdn", "combine": "additive", "reweight": 0.5}),
    "l2w": ("sdn", {}),
    "meta_gf": ("sdn", {}),
    "copycat_sl_vit": ("vit_layer", {}),
}
FINAL_HEADS = {"ztw": "mean"}  # ZTW's final exit is the network's own classifier
# copycat: its second stage (copying a random network) undoes the first; the copy stage alone
RECIPE_OPTIONS = {"l2w": {"meta_interval": 1}, "copycat_sl_vit": {"pretrain_exits": False}}


def cnn(head: str = "sdn", head_kwargs=None, seed: int = 0,
        final_head: str | None = None) -> ew.MultiExitModel:
    torch.manual_seed(seed)
    stem = nn.Conv2d(1, 6, 3, padding=1)
    blocks = nn.Sequential(
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
    )
    backbone = ew.SequentialBackbone(blocks, stem=stem, example=torch.randn(1, 1, 8, 8))
    return ew.attach_exits(
        backbone,
        ew.ExitConfig(layers="all", head=head, num_labels=3, dropout=0.0,
                      head_kwargs=dict(head_kwargs or {}), final_head=final_head,
                      final_head_kwargs={} if final_head else None),
    )


def image_items(n: int = 96, seed: int = 0) -> list[dict]:
    """Label = which third of the image (left / middle / right columns) is brightest."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        x = torch.randn(1, 8, 8, generator=g) * 0.5
        label = i % 3
        x[:, :, label * 3 : label * 3 + 2] += 1.0
        items.append({"pixel_values": x, "labels": label})
    return items


def objective(model, stage, items) -> float:
    batch = PaddingCollator()(items)
    labels = batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return float(stage.loss(model(**batch, **stage.forward_kwargs), labels))


@pytest.mark.parametrize("name", sorted(CNN_HEADS))
def test_recipe_lowers_its_loss_on_a_cnn(name, tmp_path):
    head, kwargs = CNN_HEADS[name]
    model = cnn(head, kwargs, final_head=FINAL_HEADS.get(name))
    items = image_items()
    recipe = get_strategy(name, **RECIPE_OPTIONS.get(name, {}))
    stages = recipe.stages(model)
    before = [objective(model, s, items) for s in stages]
    args = {**FAST, "learning_rate": 1e-2, "per_device_train_batch_size": 32}
    result = train(model, items, strategy=recipe, output_dir=tmp_path, max_steps=9,
                   save_final=False, **args)
    assert all(s.global_step == 9 for s in result.stages)
    after = [objective(model, s, items) for s in recipe.stages(model)]
    for s, b, a in zip(stages, before, after):
        assert a < b - 0.01, f"{name}/{s.name}: {b:.4f} -> {a:.4f}"


# -- gradient equilibrium ------------------------------------------------------------------
def test_gradient_equilibrium_averages_exit_gradients_on_the_backbone():
    """GE: blocks before exit k get the mean of the gradients of exits k..K-1, not their sum;
    the heads' own gradients are untouched; the forward values do not change."""
    model = cnn("linear").train()
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    ce = nn.functional.cross_entropy
    blocks = list(model.backbone.blocks)
    k_total = model.num_exits  # one exit per block here

    per_exit = []  # grads of block params for each exit's loss alone (plain forward)
    for k in range(k_total):
        model.zero_grad()
        ce(model(pixel_values=x).logits[k], y).backward()
        per_exit.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                         for n, p in model.named_parameters()})

    model.zero_grad()
    out = model(pixel_values=x, grad_scales=gradient_equilibrium_scales(k_total))
    plain = model(pixel_values=x).logits
    for a, b in zip(out.logits, plain):
        torch.testing.assert_close(a, b)
    sum(ce(z, y) for z in out.logits).backward()
    for i, _ in enumerate(blocks):
        for n, p in blocks[i].named_parameters():
            full = f"backbone.blocks.{i}.{n}"
            expected = sum(per_exit[k][full] for k in range(i, k_total)) / (k_total - i)
            torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)
            if i == 0:  # really rescaled: differs from the plain sum
                plain_sum = sum(per_exit[k][full] for k in range(k_total))
                assert not torch.allclose(p.grad, plain_sum)
    for k, h in enumerate(model.heads):
        for n, p in h.named_parameters():
            torch.testing.assert_close(p.grad, per_exit[k][f"heads.{k}.{n}"], atol=1e-6, rtol=1e-5)


# -- SDN ramp ------------------------------------------------------------------------------
def test_sdn_ramp_grows_ic_weights_linearly_with_the_epoch():
    progress = TrainingProgress()
    loss = RampedExitLoss([0.25, 0.5], progress)
    assert loss.weights() == [0.25, 0.5, 1.0]  # outside training: the targets
    progress.num_epochs = 4
    progress.epoch = 0.3  # first epoch (1-based e = 1)
    torch.testing.assert_close(torch.tensor(loss.weights()), torch.tensor([0.01 + 0.25 / 4, 0.01 + 0.5 / 4, 1.0]))
    progress.epoch = 3.5
    assert loss.weights() == [0.25, 0.5, 1.0]  # capped at the targets
    model = cnn()
    (stage,) = get_strategy("sdn_ramp").stages(model)
    # SDN's targets are the ICs' FLOPs fractions (stem included), by hand from the convs
    # (2 * C_in * C_out * 9 * H_out * W_out): stem 6912, blocks 41472, 13824, 18432
    total = 6912 + 41472 + 13824 + 18432
    torch.testing.assert_close(torch.tensor(stage.loss.targets),
                               torch.tensor([(6912 + 41472) / total,
                                             (6912 + 41472 + 13824) / total]))
    with pytest.raises(ConfigError, match="targets"):
        get_strategy("sdn_ramp", targets=[0.1]).stages(model)


def test_sdn_ramp_sees_the_trainers_progress(tmp_path):
    model = cnn()
    recipe = get_strategy("sdn_ramp")
    seen = []

    class Spy(RampedExitLoss):
        def __call__(self, outputs, labels):
            seen.append((self.progress.epoch, self.progress.num_epochs, self.weights()[0]))
            return super().__call__(outputs, labels)

    original = recipe.build_stages

    def build(m):
        (stage,) = original(m)
        stage.loss = Spy(stage.loss.targets, stage.progress)
        return [stage]

    recipe.build_stages = build
    train(model, image_items(64), strategy=recipe, output_dir=tmp_path, num_train_epochs=4,
          save_final=False, **{**FAST, "per_device_train_batch_size": 32})
    assert [s[1] for s in seen] == [4] * 8
    weights = [s[2] for s in seen]
    assert weights[0] < weights[2] < weights[4] < weights[6]  # one step up per epoch
    torch.testing.assert_close(torch.tensor(weights[0]), torch.tensor(0.01 + 0.6 / 4))


def test_sdn_ic_only_freezes_the_network_and_final_head():
    model = cnn()
    (stage,) = get_strategy("sdn_ic_only").stages(model)
    names = stage.trainable_names(model)
    assert not any(n.startswith("backbone.") or n.startswith("heads.2.") for n in names)
    assert {n.split(".")[1] for n in names} == {"0", "1"}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["sdn_ic_only", "ztw"])
def test_frozen_backbone_recipes_leave_batchnorm_statistics_alone(name, tmp_path):
    """The Trainer puts the model in train mode every step; a frozen network's BatchNorm must
    still neither update its running statistics nor normalise with batch statistics."""
    torch.manual_seed(0)
    blocks = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
        nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU()),
    )
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 8, 8))
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="sdn", num_labels=3,
                                                    dropout=0.0))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train(model, image_items(), strategy=name, output_dir=tmp_path, max_steps=4,
          save_final=False, **{**FAST, "per_device_train_batch_size": 32})
    for k, v in model.backbone.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, before[k]), k


# -- ZTW -----------------------------------------------------------------------------------
def test_ztw_stores_the_ensemble_with_the_heads(tmp_path):
    model = cnn("cascade", {"base": "sdn"}, final_head="mean")
    train(model, image_items(64), strategy="ztw", output_dir=tmp_path / "run", max_steps=4,
          save_final=False, **FAST)
    found = ztw_ensemble_weights(model)
    k, c = model.num_exits - 1, model.num_labels  # the ICs only, not the final head
    w = torch.tensor(found["weights"])
    assert w.shape == (k, k) and (w >= 0).all() and not w.triu(1).any()
    assert torch.tensor(found["bias"]).shape == (k, c)
    assert torch.tensor(found["bias"]).abs().sum() > 0  # stage 2 trained it
    model.save_pretrained(tmp_path / "saved")
    loaded = ew.MultiExitModel.from_pretrained(tmp_path / "saved", backbone=model.backbone)
    assert ztw_ensemble_weights(loaded) == found
    with pytest.raises(ConfigError, match="ensemble"):
        ztw_ensemble_weights(cnn())


def test_ztw_ic_stage_keeps_backbone_and_final_head():
    model = cnn("cascade", final_head="mean")
    s1, s2 = get_strategy("ztw").stages(model)
    names1 = s1.trainable_names(model)
    assert not any(n.startswith("backbone.") or n.startswith("heads.2.") for n in names1)
    assert s2.trainable_names(model) == {"ensemble.raw_weight", "ensemble.bias"}
    s1b, _ = get_strategy("ztw", train_backbone=True).stages(model)
    assert any(n.startswith("backbone.") for n in s1b.trainable_names(model))


# -- boosting ------------------------------------------------------------------------------
def test_boosted_heads_fit_the_residual_of_the_detached_ensemble():
    model = cnn("cascade", {"base": "linear", "combine": "additive", "reweight": 0.5}).train()
    (stage,) = get_strategy("boosted", gradient_rescaling=False).stages(model)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    out = model(pixel_values=x)
    # the loss is sum_k CE(F_k), F_k = f_k + 0.5 F_{k-1}.detach(): the heads' own outputs
    expected = sum(nn.functional.cross_entropy(z, y) for z in out.logits)
    torch.testing.assert_close(stage.loss(out, y), expected)
    # exit 1's loss alone must not move head 0
    nn.functional.cross_entropy(out.logits[1], y).backward()
    assert model.heads[0].base.classifier.weight.grad is None
    assert model.heads[1].base.classifier.weight.grad.abs().sum() > 0
    model.zero_grad()
    stage.loss(model(pixel_values=x), y).backward()
    assert model.heads[0].base.classifier.weight.grad.abs().sum() > 0


def test_boosted_keeps_a_native_final_exit_out_of_the_sum():
    # a network with its own classifier keeps it as the final exit (head "native"): it
    # predicts alone, so the cascade heads before it still count as additive (no warning)
    # and its loss term is its own cross-entropy, not one with the prior added again
    import warnings

    from exitwise.heads.native import NativeHead

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(1 if i == 0 else 6, 6, 3, padding=1), nn.ReLU())
              for i in range(3)]
    own = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 1, 8, 8), classifier=own)
    model = ew.attach_exits(backbone, ew.ExitConfig(
        layers="all", head="cascade", dropout=0.0,
        head_kwargs={"base": "linear", "combine": "additive", "reweight": 0.5})).train()
    assert isinstance(model.heads[-1], NativeHead)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (stage,) = get_strategy("boosted", gradient_rescaling=False).stages(model)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    out = model(pixel_values=x)
    expected = sum(nn.functional.cross_entropy(z, y) for z in out.logits)
    torch.testing.assert_close(stage.loss(out, y), expected)
    with pytest.raises(ConfigError, match="reweight"):  # the heads' 0.5, not the native's
        get_strategy("boosted", reweight=1.0).stages(model)
    assert len(get_strategy("boosted", reweight=0.5).stages(model)) == 1


# -- meta-learning -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["l2w", "meta_gf"])
def test_meta_recipes_drop_an_epochs_single_row_last_batch(name, tmp_path):
    # 9 rows in batches of 4 leave one row at the end of the epoch: two halves cannot be cut
    # from it, so train() drops that batch unless told otherwise, and then says how to fix it
    from exitwise.errors import InputError

    model = cnn()
    result = train(model, image_items(9), strategy=name, output_dir=tmp_path / "a",
                   num_train_epochs=1, save_final=False, strategy_options=RECIPE_OPTIONS.get(
                       name), **{**FAST, "per_device_train_batch_size": 4})
    assert result.stages[-1].global_step == 2
    with pytest.raises(InputError, match="dataloader_drop_last"):
        train(cnn(), image_items(9), strategy=name, output_dir=tmp_path / "b",
              num_train_epochs=1, save_final=False, dataloader_drop_last=False,
              strategy_options=RECIPE_OPTIONS.get(name),
              **{**FAST, "per_device_train_batch_size": 4})


@pytest.mark.parametrize("name", ["l2w", "meta_gf"])
def test_meta_recipes_update_their_meta_parameters(name, tmp_path):
    model = cnn()
    recipe = get_strategy(name, **RECIPE_OPTIONS.get(name, {}))
    train(model, image_items(64), strategy=recipe, output_dir=tmp_path, max_steps=3,
          save_final=False, **FAST)
    step = recipe.last_step
    assert len(step.meta_losses) == 3  # the stage's own step ran (and meta-updated) every time
    if name == "l2w":
        before = type(step.wpn)(model.num_exits, 500)
        assert step.wpn.net[2].weight.shape == before.net[2].weight.shape
        assert step.optimizer.state  # Adam on the WPN has taken steps
    else:
        scores = torch.cat([w.flatten() for w in step.weights()])
        start = torch.sigmoid(torch.tensor(1.0))  # the reference's fusion logits start at 1
        assert not torch.allclose(scores, torch.full_like(scores, float(start)))


def test_budget_assignment_follows_the_target_distribution():
    logits = [torch.randn(10, 3) * 3 for _ in range(3)]
    exits = budget_assignment(logits, torch.tensor([0.3, 0.5, 0.2]))
    assert torch.bincount(exits, minlength=3).tolist() == [3, 5, 2]
    conf0 = logits[0].softmax(-1).amax(-1)
    assert set(conf0.topk(3).indices.tolist()) == set((exits == 0).nonzero().squeeze(1).tolist())
    # floor(n * q_k) at each exit, the rest at the last (the reference's rule): 7 rows,
    # q = (0.3, 0.3, 0.4) -> floor(2.1) = 2, floor(2.1) = 2, 3 left
    exits = budget_assignment([torch.randn(7, 3) for _ in range(3)], torch.tensor([0.3, 0.3, 0.4]))
    assert torch.bincount(exits, minlength=3).tolist() == [2, 2, 3]


# -- self-distillation ---------------------------------------------------------------------
def test_self_distill_hints_go_through_adaptation_layers():
    """BYOT's hint: lambda * torch.dist(A_k(F_k), F_final) for the hinted exits, A_k a learned
    linear map from exit k's feature width to the final one's (heads of different widths)."""
    model = cnn("linear").train()  # classifier inputs 6, 8, 8 wide
    (stage,) = get_strategy("self_distill").stages(model)
    assert stage.forward_kwargs == {"return_features": True}
    adapters = model.self_distill_adapters
    assert adapters.exits == [0]  # the reference skips outputs[1]: the exit before the final
    assert adapters.layers["0"].in_features == 6 and adapters.layers["0"].out_features == 8
    names = stage.trainable_names(model)
    assert {"self_distill_adapters.layers.0.weight", "self_distill_adapters.layers.0.bias"} <= names
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    out = model(pixel_values=x, return_features=True)
    no_hint = get_strategy("self_distill", hint_weight=0.0).stages(model)[0]
    diff = stage.loss(out, y) - no_hint.loss(out, y)
    a = adapters.layers["0"]
    f0, f2 = out.features[0], out.features[2]
    expected = 0.03 * ((f0 @ a.weight.T + a.bias - f2) ** 2).sum().sqrt()  # Frobenius norm
    torch.testing.assert_close(diff, expected)
    # the teacher (deepest exit) gets its gradient from its own cross-entropy only: the
    # students' soft targets are detached (a missing detach showed only as float residue in
    # the check below, which subtracts two losses sharing the distillation terms)
    w = model.heads[2].classifier.weight
    (byot,) = torch.autograd.grad(no_hint.loss(out, y), w, retain_graph=True)
    (own,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out.logits[2], y), w,
                                 retain_graph=True)
    torch.testing.assert_close(byot, own, atol=1e-7, rtol=0)
    # ... and none from the hints
    model.zero_grad()
    (stage.loss(out, y) - no_hint.loss(out, y)).backward()
    assert not model.heads[2].classifier.weight.grad.any()
    assert a.weight.grad.abs().sum() > 0
    shallow = cnn("linear")
    get_strategy("self_distill", hint_skip="shallowest").stages(shallow)
    assert shallow.self_distill_adapters.exits == [1]  # the reference's comment's reading
    every = cnn("linear")
    get_strategy("self_distill", hint_skip="none").stages(every)
    assert every.self_distill_adapters.exits == [0, 1]
    with pytest.raises(ConfigError, match="hint_skip"):
        get_strategy("self_distill", hint_skip="deepest")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_meta_recipes_refuse_an_inexact_mid_stage_resume(tmp_path):
    """l2w's weighting network is not in the checkpoint: resuming mid-stage is refused."""
    from helpers.trainkit import CrashAfterSave, Interrupt

    from exitwise.errors import CheckpointError

    head, kwargs = CNN_HEADS["l2w"]
    args = {**FAST, "per_device_train_batch_size": 32, "save_strategy": "steps", "save_steps": 2,
            "max_steps": 4, "save_final": False}
    with pytest.raises(Interrupt):
        train(cnn(head, kwargs), image_items(), strategy="l2w", output_dir=tmp_path,
              callbacks=[CrashAfterSave("stage-1", 2)], **args)
    with pytest.raises(CheckpointError, match="cannot resume exactly"):
        train(cnn(head, kwargs), image_items(), strategy="l2w", output_dir=tmp_path,
              resume=True, **args)


def test_boosted_refuses_a_reweight_the_heads_do_not_apply():
    model = cnn("cascade", {"base": "linear", "combine": "additive", "reweight": 0.5})
    with pytest.raises(ConfigError, match="reweight"):
        get_strategy("boosted", reweight=1.0).stages(model)
    assert len(get_strategy("boosted", reweight=0.5).stages(model)) == 1  # the heads' own

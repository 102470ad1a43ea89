"""The meta-learned recipes (L2W-DEN, Meta-GF) against hand-computed values: the optimizer's
own step as the look-ahead, L2W's weights and target distribution, both batch halves training
the model, meta updates every ``meta_interval`` steps, Meta-GF's per-layer fusion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.trainkit import FAST
from test_cv_recipes import cnn, image_items
from torch import nn

from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, get_strategy, train
from exitwise.training import l2w as l2w_module
from exitwise.training.l2w import WeightPredictionNet, budget_meta_loss
from exitwise.training.meta import geometric_exit_distribution, virtual_step
from exitwise.training.meta_gf import fuse


# -- the look-ahead is the optimizer's own step -------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, dampening=0.0),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.05),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05, betas=(0.8, 0.95)),
], ids=["sgd-momentum-wd", "sgd-nesterov", "adam-l2", "adamw"])
def test_virtual_step_is_the_optimizers_next_step(make):
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = make(net.parameters())
    for _ in range(2):  # build up state (momentum buffers, moments, step counts)
        opt.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    params = dict(net.named_parameters())
    grads = [torch.randn_like(p) for p in params.values()]
    ahead = virtual_step(params, grads, opt, lr=123.0)  # lr is only for the no-optimizer case
    for p, g in zip(params.values(), grads):
        p.grad = g.clone()
    opt.step()
    for name, p in params.items():
        torch.testing.assert_close(ahead[name], p.detach(), atol=1e-6, rtol=1e-5)


def test_virtual_step_without_an_optimizer_is_sgd():
    p = {"w": torch.ones(2)}
    out = virtual_step(p, [torch.tensor([1.0, -2.0])], None, lr=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([0.5, 2.0]))


def test_l2w_look_ahead_uses_the_trainers_optimizer(tmp_path, monkeypatch):
    seen = []

    def spy(params, grads, optimizer, lr):
        seen.append(optimizer)
        return virtual_step(params, grads, optimizer, lr)

    monkeypatch.setattr(l2w_module, "virtual_step", spy)
    recipe = get_strategy("l2w", meta_interval=1)
    train(cnn(), image_items(64), strategy=recipe, output_dir=tmp_path, max_steps=3,
          save_final=False, **FAST)
    assert len(seen) == 6  # two halves per step
    assert seen[:2] == [None, None]  # before the optimizer's first step: no state yet
    assert all(isinstance(o, torch.optim.AdamW) for o in seen[2:])  # the Trainer's (adamw_torch)
    assert all(o.state for o in seen[2:])


# -- L2W -------------------------------------------------------------------------------------
def test_l2w_weights_are_one_plus_eps_centered_tanh():
    torch.manual_seed(0)
    wpn = WeightPredictionNet(3, hidden=7, epsilon=0.3, constraint="mat")
    losses = torch.rand(4, 3) * 3
    u = torch.tanh(wpn.net[2](torch.relu(wpn.net[0](losses))))
    torch.testing.assert_close(wpn(losses), 1 + 0.3 * (u - u.mean()))
    wpn.constraint = "row"
    torch.testing.assert_close(wpn(losses), 1 + 0.3 * (u - u.mean(0, keepdim=True)))
    wpn.constraint = "col"
    torch.testing.assert_close(wpn(losses), 1 + 0.3 * (u - u.mean(1, keepdim=True)))


def test_l2w_target_distribution_is_geometric():
    q = geometric_exit_distribution(3, 0.75)
    raw = torch.tensor([0.75, 0.75**2, 0.75**3])
    torch.testing.assert_close(q, raw / raw.sum())
    torch.testing.assert_close(geometric_exit_distribution(4, 1.0), torch.full((4,), 0.25))
    recipe = get_strategy("l2w")
    recipe.stages(cnn())
    torch.testing.assert_close(recipe.last_step.shares, q)  # the default ratio: 15 / 20


def test_l2w_meta_loss_sums_the_exits_mean_ce_of_their_assigned_rows():
    z = [torch.tensor([[5.0, 0, 0], [0, 0.1, 0], [0, 0, 4.0], [0.2, 0, 0]]),
         torch.tensor([[0.0, 1, 0], [0, 3.0, 0], [1.0, 0, 0], [0, 0, 2.0]])]
    y = torch.tensor([0, 1, 2, 1])
    # shares (0.5, 0.5): exit 0 takes floor(4 * 0.5) = 2 most confident (rows 0, 2), exit 1 the rest
    expected = (F.cross_entropy(z[0][[0, 2]], y[[0, 2]])
                + F.cross_entropy(z[1][[1, 3]], y[[1, 3]]))
    out = budget_meta_loss(ExitOutputs(logits=z), y, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out, expected)


def test_l2w_step_trains_on_both_halves_with_the_updated_weights():
    model = cnn().train()
    recipe = get_strategy("l2w", meta_interval=1, inner_learning_rate=0.1)
    recipe.stages(model)
    step = recipe.last_step
    batch = PaddingCollator()(image_items(8))
    labels = batch.pop("labels")
    before = {n: p.detach().clone() for n, p in step.wpn.named_parameters()}
    loss, out = step(model, batch, labels)
    assert len(step.meta_losses) == 1
    assert any(not torch.equal(before[n], p) for n, p in step.wpn.named_parameters())
    assert out.logits[0].shape[0] == 8  # both halves' rows
    with torch.no_grad():  # the objective on the whole batch, with the updated WPN
        losses = torch.stack([F.cross_entropy(model(pixel_values=batch["pixel_values"][h * 4:(h + 1) * 4]).logits[k],
                                              labels[h * 4:(h + 1) * 4], reduction="none")
                              for h in range(2) for k in range(3)]).view(2, 3, 4)
        losses = losses.permute(0, 2, 1).reshape(8, 3)  # (rows, exits), halves in order
        w = torch.cat([step.wpn(losses[:4]), step.wpn(losses[4:])])
    torch.testing.assert_close(loss.detach(), (w * losses).mean(0).sum())
    model.zero_grad()
    loss.backward()
    assert model.heads[0].classifier.weight.grad.abs().sum() > 0


def test_l2w_meta_updates_every_meta_interval_steps():
    model = cnn().train()
    recipe = get_strategy("l2w", meta_interval=2)
    (stage,) = recipe.stages(model)
    step = recipe.last_step
    batch = PaddingCollator()(image_items(6))
    labels = batch.pop("labels")
    for i in range(4):
        stage.progress.step = i
        step(model, batch, labels)
    assert len(step.meta_losses) == 2  # steps 0 and 2


# -- Meta-GF ---------------------------------------------------------------------------------
def test_fusion_is_a_sigmoid_weighted_average_over_the_exits_that_reach_a_tensor():
    a = torch.tensor([0.3, -1.0, 2.0])
    g0, g1, g2 = torch.ones(2), torch.full((2,), 2.0), torch.full((2,), -1.0)
    per_exit = [[g0, None], [g1, None], [None, g2]]  # tensor 0: exits 0, 1; tensor 1: exit 2
    fused = fuse(per_exit, [torch.sigmoid(a), torch.sigmoid(a)])
    s0, s1 = torch.sigmoid(a[0]), torch.sigmoid(a[1])
    torch.testing.assert_close(fused[0], (s0 * g0 + s1 * g1) / (s0 + s1))
    torch.testing.assert_close(fused[1], g2)  # reached by one exit: its own gradient
    chan = torch.sigmoid(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # (K=2, channels=2)
    w = torch.ones(2, 3)
    out = fuse([[w], [3 * w]], [chan])[0]
    expected = (chan[0][:, None] * w + chan[1][:, None] * 3 * w) / (chan[0] + chan[1])[:, None]
    torch.testing.assert_close(out, expected)


def test_meta_gf_hands_the_fused_whole_batch_gradient_to_the_trainer():
    model = cnn().train()
    recipe = get_strategy("meta_gf", inner_learning_rate=0.1)
    recipe.stages(model)
    step = recipe.last_step
    batch = PaddingCollator()(image_items(8))
    labels = batch.pop("labels")
    loss, _ = step(model, batch, labels)
    params = dict(model.named_parameters())
    # by hand: each exit's gradient on each half, averaged, fused with the updated weights
    per_exit = [[None] * len(params) for _ in range(3)]
    for h in range(2):
        rows = slice(h * 4, (h + 1) * 4)
        out = model(pixel_values=batch["pixel_values"][rows])
        for k in range(3):
            gs = torch.autograd.grad(F.cross_entropy(out.logits[k], labels[rows]),
                                     list(params.values()), retain_graph=True, allow_unused=True)
            for i, g in enumerate(gs):
                if g is not None:
                    per_exit[k][i] = g / 2 if per_exit[k][i] is None else per_exit[k][i] + g / 2
    expected = fuse(per_exit, [w.detach() for w in step.weights()])
    model.zero_grad()
    loss.backward()
    block0 = list(params).index("backbone.blocks.0.0.weight")  # reached by all three exits
    for i, (name, p) in enumerate(params.items()):
        if expected[i] is not None:
            torch.testing.assert_close(p.grad, expected[i], atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.allclose(expected[block0], sum(per_exit[k][block0] for k in range(3)))
    assert len(step.logits) == len(params) and step.logits[0].shape == (3,)
    (chan,) = get_strategy("meta_gf", granularity="channel").stages(cnn())
    chan.step(model, batch, labels)
    assert chan.step.logits[0].shape == (3, model.backbone.stem.out_channels)

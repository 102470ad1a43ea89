"""LeeBERT (``training/leebert.py``): the mutual-distillation loss against a value computed by
hand, the loss weights' meta-gradient against its hand-derived form and its direction on a
case where distilling helps (or hurts) the held-out loss, the step training on both halves
with the updated weights, and the recipe end to end on a tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items
from torch import nn

import exitwise as ew
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, get_strategy, train
from exitwise.training.leebert import leebert_loss, mutual_distillation_loss


def softmax(v):
    z = sum(math.exp(x) for x in v)
    return [math.exp(x) / z for x in v]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_mutual_distillation_by_hand():
    z = [torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, -1.0], [0.0, 0.5]]),
         torch.tensor([[0.3, 0.0], [-1.0, 1.0]])]
    w = torch.tensor([[9.0, 0.5, 2.0], [1.0, 9.0, 0.0], [0.25, 3.0, 9.0]])  # diagonal unused
    t = 2.0
    want = 0.0
    for k in range(3):  # student k, teacher j: w_kj T^2 KL(p_j || p_k), batch mean, / (K-1)
        for j in range(3):
            if j != k:
                term = sum(kl(softmax([x / t for x in zj.tolist()]),
                              softmax([x / t for x in zk.tolist()]))
                           for zk, zj in zip(z[k], z[j])) / 2
                want += float(w[k, j]) * t * t * term / 2
    out = ExitOutputs(logits=z)
    assert float(mutual_distillation_loss(out, w, t)) == pytest.approx(want, rel=1e-6)
    y = torch.tensor([1, 0])
    ce = sum(-math.log(softmax(zk[r].tolist())[int(y[r])]) for zk in z for r in range(2)) / 2
    assert float(leebert_loss(out, y, w, t)) == pytest.approx(ce + want, rel=1e-6)
    # teachers only give targets: with w = only (0 learns from 1), exit 1 gets no gradient
    leaf = [x.clone().requires_grad_(True) for x in z]
    only = torch.zeros(3, 3)
    only[0, 1] = 1.0
    mutual_distillation_loss(ExitOutputs(logits=leaf), only).backward()
    assert leaf[0].grad.abs().sum() > 0 and not leaf[1].grad.abs().any()
    with pytest.raises(ew.InputError, match="weights of shape"):
        mutual_distillation_loss(out, torch.ones(2, 2))


# -- the cross-level step on a case worked out by hand -----------------------------------------
X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEACHER = torch.tensor([0, 1])  # exit 1 predicts argmax(x)


def two_exit_model() -> ew.MultiExitModel:
    """Identity blocks, two linear exits: exit 0 (the student, all zeros: uniform) trains,
    exit 1 (the teacher, argmax of x with probabilities 0.99 / 0.01) is frozen."""
    backbone = ew.SequentialBackbone([nn.Identity(), nn.Identity()], example=torch.zeros(1, 2))
    model = ew.attach_exits(backbone, layers="all", head="linear", num_labels=2, dropout=0.0)
    with torch.no_grad():
        model.heads[0].classifier.weight.zero_()
        model.heads[0].classifier.bias.zero_()
        model.heads[1].classifier.weight.copy_(torch.eye(2) * math.log(99.0))
        model.heads[1].classifier.bias.zero_()
    for p in model.heads[1].parameters():
        p.requires_grad_(False)
    return model


def by_hand_meta_gradient(train_y: torch.Tensor, meta_y: torch.Tensor, lr: float
                          ) -> tuple[float, float]:
    """The held-out objective M = sum_k CE_k(meta; theta') at theta' = theta - lr grad
    L(theta, w), w = 1, and its derivative in w_01.

    Exit 0 is linear with W = 0, b = 0 (p = [1/2, 1/2]); for softmax regression
    grad_W CE = mean_i (p_i - e_yi) x_i^T, grad_W KL(q || p) = mean_i (p_i - q_i) x_i^T, and
    the same without x_i for b. Only exit 0 trains (K - 1 = 1), so
    theta' = -lr (grad CE_0 + w_01 grad KD_01) and
    dM/dw_01 = -lr <grad CE_0(meta; theta'), grad KD_01(train; theta)>."""
    e = torch.eye(2)
    q = torch.tensor([[0.99, 0.01], [0.01, 0.99]])  # the teacher's distributions on X
    p = torch.full((2, 2), 0.5)
    g_ce_w = (p - e[train_y]).T @ X / 2
    g_ce_b = (p - e[train_y]).mean(0)
    g_kd_w = (p - q).T @ X / 2
    g_kd_b = (p - q).mean(0)
    w_new, b_new = -lr * (g_ce_w + g_kd_w), -lr * (g_ce_b + g_kd_b)
    p_new = torch.softmax(X @ w_new.T + b_new, -1)
    g_meta_w = (p_new - e[meta_y]).T @ X / 2
    g_meta_b = (p_new - e[meta_y]).mean(0)
    held = -(p_new[[0, 1], meta_y].log().mean() + q[[0, 1], meta_y].log().mean())
    return float(held), float(-lr * ((g_meta_w * g_kd_w).sum() + (g_meta_b * g_kd_b).sum()))


@pytest.mark.parametrize("meta_y, direction", [
    (TEACHER, +1),      # held-out labels agree with the teacher: distilling helps, w_01 rises
    (1 - TEACHER, -1),  # they agree with the (noisy) training labels instead: w_01 falls
])
def test_weight_of_a_helpful_distillation_term_rises(meta_y, direction):
    model = two_exit_model()
    recipe = get_strategy("leebert", inner_learning_rate=0.5, meta_learning_rate=0.01)
    recipe.stages(model)
    step = recipe.last_step
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    train_y = 1 - TEACHER  # training labels contradict the teacher
    train_out = model(pixel_values=X)
    held, grad = step.meta_gradient(model, params, train_out, train_y, {"pixel_values": X},
                                    meta_y)
    want_held, want = by_hand_meta_gradient(train_y, meta_y, lr=0.5)
    assert float(held) == pytest.approx(want_held, rel=1e-5)
    assert float(grad[0, 1]) == pytest.approx(want, rel=1e-4)
    assert math.copysign(1.0, want) == -direction
    # w_10 (the frozen teacher learning from the student) and the diagonal cannot matter
    assert float(grad[1, 0]) == 0.0 and not grad.diagonal().any()
    step.meta_update(model, params, model(pixel_values=X), train_y, {"pixel_values": X}, meta_y)
    w = step.weights.detach()
    moved = float(w[0, 1]) - 1.0  # Adam's first step: the learning rate, against the gradient
    assert math.copysign(1.0, moved) == direction and abs(moved) == pytest.approx(0.01, rel=1e-3)
    assert float(w[1, 0]) == 1.0


def test_step_meta_updates_on_both_halves_then_trains_on_the_whole_batch():
    model = tiny_model().train()
    recipe = get_strategy("leebert", inner_learning_rate=0.1, meta_learning_rate=0.05)
    recipe.stages(model)
    step = recipe.last_step
    batch = PaddingCollator()(token_items(8, seed=2))
    labels = batch.pop("labels")
    loss, out = step(model, batch, labels)
    assert len(step.meta_losses) == 1 and out.logits[0].shape[0] == 8
    w = step.weights.detach()
    off = ~torch.eye(4, dtype=torch.bool)
    assert not torch.equal(w[off], torch.ones(12))  # two meta steps moved the weights
    with torch.no_grad():  # the objective on both halves (means weighted by size), new w
        parts = [(slice(0, 4), 4), (slice(4, 8), 4)]
        want = sum(n * leebert_loss(model(**{k: v[s] for k, v in batch.items()}), labels[s], w)
                   for s, n in parts) / 8
    torch.testing.assert_close(loss.detach(), want)
    model.zero_grad()
    loss.backward()
    assert model.backbone.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_leebert_end_to_end(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model()
    recipe = get_strategy("leebert")
    train(model, items, strategy=recipe, output_dir=tmp_path, max_steps=30,
          save_final=False, **FAST)
    step = recipe.last_step
    assert len(step.meta_losses) == 30  # a meta update every step (meta_interval=1)
    assert bool((step.weights >= 0).all())
    model.eval()
    batch = PaddingCollator()(items[:32])
    labels = batch.pop("labels")
    with torch.no_grad():
        out = model(**batch)
    accs = [float((z.argmax(-1) == labels).float().mean()) for z in out.logits]
    assert accs[-1] > 0.75 and max(accs[:-1]) > 0.75, accs


def test_misuse_raises_config_errors(tmp_path):
    for bad, match in [({"temperature": 0}, "temperature"),
                       ({"meta_learning_rate": 0}, "meta_learning_rate"),
                       ({"meta_interval": 0}, "meta_interval"),
                       ({"inner_learning_rate": -1.0}, "inner_learning_rate")]:
        with pytest.raises(ew.ConfigError, match=match):
            get_strategy("leebert", **bad)
    with pytest.raises(ew.ConfigError, match="two exits"):
        get_strategy("leebert").stages(tiny_model(layers=[4]))
    items = token_items(8)
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(num_labels=1), [dict(i, labels=0.5) for i in items],
              strategy="leebert", output_dir=tmp_path, max_steps=1, **FAST)

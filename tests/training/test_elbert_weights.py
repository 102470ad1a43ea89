"""ELBERT's learned exit weights (``training/elbert.py``): the weights and the weighted loss
against values computed by hand, one step of the weight logits against Adam's first step on
the hand-derived gradient ``sigmoid'(t_k) (L_k - L_final)``, the recipe end to end (with the
``elbert`` exit policy, runtime == replay) and regression."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, get_strategy, train
from exitwise.training.elbert import ELBERTStep, elbert_loss, elbert_weights


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_weights_and_loss_by_hand():
    t = torch.tensor([4.0, 0.0, -1.0])  # three internal exits, the final one takes the rest
    want_w = [sigmoid(4.0), 0.5, sigmoid(-1.0)]
    want_w.append(4 - sum(want_w))
    torch.testing.assert_close(elbert_weights(t), torch.tensor(want_w))
    z = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 0.5], [1.0, -1.0]]),
         torch.tensor([[-1.0, 1.0], [0.0, 3.0]]), torch.tensor([[3.0, 0.0], [0.0, 2.0]])]
    y = torch.tensor([0, 1])

    def ce(logits, label):
        return -logits[label] + math.log(sum(math.exp(v) for v in logits))

    losses = [sum(ce(zk[b].tolist(), int(y[b])) for b in range(2)) / 2 for zk in z]
    got = elbert_loss(ExitOutputs(logits=z), y, elbert_weights(t))
    assert got.item() == pytest.approx(sum(w * L for w, L in zip(want_w, losses)), rel=1e-6)


class FixedExits(torch.nn.Module):
    """Three exits whose logits are fixed: losses known in advance, the weights' step alone."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **inputs):
        return ExitOutputs(logits=[z.clone().requires_grad_(True) for z in self.logits])


def test_one_weight_step_follows_the_hand_derived_gradient():
    """Adam's first step moves each logit by lr * sign(grad) (|grad| >> eps); the gradient is
    sigmoid'(t_k) (L_k - L_final): exit 0 (loss above the final's) loses weight, exit 1
    (below) gains, and the returned loss uses the weights from before the step."""
    y = torch.tensor([0, 0])
    z = [torch.tensor([[0.0, 2.0], [0.0, 1.0]]),   # worse than the final exit
         torch.tensor([[4.0, 0.0], [5.0, 0.0]]),   # better
         torch.tensor([[1.0, 0.0], [1.0, 0.0]])]   # the final exit
    losses = [float(F.cross_entropy(zk, y)) for zk in z]
    step = ELBERTStep(3, weight_init=4.0, learning_rate=0.01)
    before = elbert_weights(step.logits.detach())
    loss, _ = step(FixedExits(z), {}, y)
    assert loss.item() == pytest.approx(float((before * torch.tensor(losses)).sum()), rel=1e-6)
    grad = [sigmoid(4.0) * (1 - sigmoid(4.0)) * (losses[k] - losses[2]) for k in range(2)]
    want = [4.0 - 0.01 * math.copysign(1.0, g) for g in grad]
    torch.testing.assert_close(step.logits.detach(), torch.tensor(want))
    w = step.weights
    assert w[0] < before[0].item() and w[1] > before[1].item()
    assert sum(w) == pytest.approx(3.0)  # the total stays E


def test_elbert_end_to_end_with_its_exit_policy(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model()
    recipe = get_strategy("elbert", weight_learning_rate=0.05)
    train(model, items, strategy=recipe, output_dir=tmp_path, max_steps=40,
          save_final=False, **FAST)
    w = recipe.last_step.weights
    assert w != pytest.approx([0.982] * 3 + [1.054], abs=1e-3)  # the weights moved
    assert sum(w) == pytest.approx(4.0, abs=1e-5) and w[-1] >= 1.0
    model.eval()
    loader = [PaddingCollator()(items[s: s + 16]) for s in range(0, 96, 16)]
    cache = collect_exit_logits(model, loader, progress=False)
    accs = [float((cache.logits[:, k].argmax(-1) == cache.labels).float().mean())
            for k in range(4)]
    assert accs[-1] > 0.8, accs
    policy = ew.get_policy("elbert", threshold=0.3)
    offline = replay(policy, cache, model.temperatures)
    run = torch.cat([model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
                     .exit_index for b in loader])
    assert torch.equal(run, offline.exit_index)


def test_regression_and_misuse(tmp_path):
    items = [dict(i, labels=float(len(i["input_ids"])) / 12) for i in token_items(32)]
    recipe = get_strategy("elbert")
    train(tiny_model(num_labels=1), items, strategy=recipe, output_dir=tmp_path, max_steps=3,
          save_final=False, **FAST)
    assert len(recipe.last_step.weights) == 4
    with pytest.raises(ew.ConfigError, match="two exits"):
        get_strategy("elbert").stages(tiny_model(layers=[4]))
    with pytest.raises(ew.ConfigError, match="weight_learning_rate"):
        get_strategy("elbert", weight_learning_rate=-1)
    with pytest.raises(ew.ConfigError, match="weight_init"):
        get_strategy("elbert", weight_init="4")

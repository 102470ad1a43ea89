"""``ensemble_ic`` (Sun et al. 2021, reconstructed objective): the loss against a value computed
by hand for both diversity variants, the option and task checks, and a short run on a 3-class
task followed by the ``voting`` exit at runtime and in replay."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.errors import ConfigError
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, get_strategy, train


def softmax(v):
    z = sum(math.exp(x) for x in v)
    return [math.exp(x) / z for x in v]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


EXITS = [
    [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]],
    [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]],
    [[2.0, -1.0, 0.0], [0.0, 3.0, 1.0]],
]
LABELS = [0, 1]


def by_hand(weight: float, non_target: bool) -> float:
    """mean_k CE_k - weight * mean_{i != j} mean_b KL(q_i || q_j)."""
    k, b = len(EXITS), len(LABELS)
    ce = sum(-math.log(softmax(EXITS[e][r])[LABELS[r]]) for e in range(k) for r in range(b))
    ce /= k * b

    def q(e, r):
        z = EXITS[e][r]
        if non_target:
            z = [x for c, x in enumerate(z) if c != LABELS[r]]
        return softmax(z)

    div = sum(kl(q(i, r), q(j, r)) for i in range(k) for j in range(k) if i != j
              for r in range(b)) / b / (k * (k - 1))
    return ce - weight * div


@pytest.mark.parametrize("diversity", ["full", "non_target"])
def test_loss_is_mean_cross_entropy_minus_weighted_pairwise_kl(diversity):
    outputs = ExitOutputs(logits=[torch.tensor(z) for z in EXITS])
    labels = torch.tensor(LABELS)
    three = tiny_model(num_labels=3, layers=[2, 3])  # exits at depths 2, 3 and the final 4
    assert three.num_exits == 3
    (stage,) = get_strategy("ensemble_ic", diversity=diversity,
                            diversity_weight=0.3).stages(three)
    want = by_hand(0.3, diversity == "non_target")
    assert float(stage.loss(outputs, labels)) == pytest.approx(want, rel=1e-5)
    # without diversity it is the joint (uniform) objective
    (plain,) = get_strategy("ensemble_ic", diversity_weight=0.0).stages(three)
    (joint,) = get_strategy("joint").stages(three)
    torch.testing.assert_close(plain.loss(outputs, labels), joint.loss(outputs, labels))
    # the diversity term changes every exit's gradient (it is not a constant offset)
    grads = []
    for loss in (stage.loss, joint.loss):
        leaves = [torch.tensor(z, requires_grad=True) for z in EXITS]
        loss(ExitOutputs(logits=leaves), labels).backward()
        grads.append([t.grad for t in leaves])
    assert all(not torch.allclose(a, b) for a, b in zip(*grads))


def test_bad_options_and_tasks_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="diversity"):
        get_strategy("ensemble_ic", diversity="pairwise")
    for bad in (-0.1, float("nan"), float("inf"), "much"):
        with pytest.raises(ConfigError, match="diversity_weight"):
            get_strategy("ensemble_ic", diversity_weight=bad)
    with pytest.raises(ConfigError, match="3 classes"):
        get_strategy("ensemble_ic", diversity="non_target").stages(tiny_model(num_labels=2))
    with pytest.raises(ConfigError, match="two exits"):
        get_strategy("ensemble_ic").stages(tiny_model(layers=[4]))
    items = token_items(8)
    with pytest.raises(ConfigError, match="classification"):
        train(tiny_model(num_labels=1), [dict(i, labels=0.5) for i in items],
              strategy="ensemble_ic", output_dir=tmp_path, max_steps=1, **FAST)


def three_class_items(n: int, seed: int) -> list[dict]:
    """Label 0, 1 or 2 by whether token 7, token 6 or neither appears."""
    items = token_items(n, seed=seed)
    for i, item in enumerate(items):
        ids = [t for t in item["input_ids"] if t not in (6, 7)] or [9]
        label = i % 3
        if label:
            ids[len(ids) // 2] = 7 if label == 1 else 6
        item.update(input_ids=ids, attention_mask=[1] * len(ids), labels=label)
    return items


def test_short_run_then_voting_exit(tmp_path):
    items = three_class_items(96, seed=0)
    model = tiny_model(num_labels=3)
    result = train(model, items, strategy="ensemble_ic",
                   strategy_options={"diversity": "non_target", "diversity_weight": 0.05},
                   output_dir=tmp_path, max_steps=30, save_final=False, **FAST)
    assert [s.name for s in result.stages] == ["stage-1"]
    model.eval()
    loader = [PaddingCollator()(items[s:s + 32]) for s in range(0, 96, 32)]
    cache = collect_exit_logits(model, loader, progress=False)
    final = cache.logits[:, -1].argmax(-1)
    assert float((final == cache.labels).float().mean()) > 0.6  # chance is 1/3
    policy = ew.get_policy("voting", votes=2)
    offline = replay(policy, cache)
    run = torch.cat([model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
                     .exit_index for b in loader])
    assert torch.equal(run, offline.exit_index)

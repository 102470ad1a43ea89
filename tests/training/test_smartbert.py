"""SmartBERT's training (``training/smartbert.py``): the token-level contrastive loss, the hard
weight mechanism and the skip reward against values computed by hand; both stages' losses on
a tiny BERT whose gates give fixed probabilities, against a block-by-block computation; the
special training mode; clear errors; the whole method end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.trainkit import FAST, StageRecorder, tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.policies.entropy import prediction_entropy
from exitwise.training import PaddingCollator, get_strategy, train
from exitwise.training.base import TrainingProgress
from exitwise.training.smartbert import (
    PROJECTIONS,
    FirstStage,
    SmartBERTStrategy,
    hard_weight,
    mix,
    skip_reward,
    token_contrastive_loss,
)


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def info_nce_by_hand(a, b, n, t, include_positive):
    """Per anchor i < n: log sum_j exp(s_ij) - s_ii over j < n (j != i without the positive),
    s_ij = <a_i, b_j> / t on unit vectors; a list of the anchors' losses."""
    a, b = [unit(v) for v in a[:n]], [unit(v) for v in b[:n]]
    s = [[sum(x * y for x, y in zip(ai, bj)) / t for bj in b] for ai in a]
    out = []
    for i in range(n):
        js = [j for j in range(n) if include_positive or j != i]
        if js:
            out.append(math.log(sum(math.exp(s[i][j]) for j in js)) - s[i][i])
    return out


def test_token_contrastive_loss_by_hand():
    a = [[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]], [[0.3, -1.0], [7.0, 7.0], [1.0, 1.0]]]
    b = [[[1.0, 1.0], [1.0, -1.0], [-3.0, 2.0]], [[2.0, 0.5], [1.0, 0.0], [0.0, 1.0]]]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # the second row has one real token
    for include in (True, False):
        terms = (info_nce_by_hand(a[0], b[0], 2, 0.5, include)
                 + info_nce_by_hand(a[1], b[1], 1, 0.5, include))
        want = sum(terms) / len(terms)
        got = token_contrastive_loss(torch.tensor(a), torch.tensor(b), mask, 0.5, include)
        assert float(got) == pytest.approx(want, rel=1e-6)
    # without the positive, the one-token row has no negative and is left out: 2 anchors
    assert len(info_nce_by_hand(a[1], b[1], 1, 0.5, False)) == 0
    # padding is neither anchor nor negative
    noisy_a, noisy_b = torch.tensor(a), torch.tensor(b)
    noisy_a[0, 2], noisy_b[1, 1:] = torch.tensor([-4.0, 9.0]), 3.0
    for include in (True, False):
        torch.testing.assert_close(
            token_contrastive_loss(noisy_a, noisy_b, mask, 0.5, include),
            token_contrastive_loss(torch.tensor(a), torch.tensor(b), mask, 0.5, include))


def test_hard_weight_is_the_decision_forward_and_straight_through_backward():
    probs = torch.tensor([0.2, 0.5, 0.7], requires_grad=True)
    w = hard_weight(probs, 0.5)
    assert w.tolist() == [0.0, 1.0, 1.0]  # >= threshold: skip (weight 1)
    (w * torch.tensor([3.0, -1.0, 2.0])).sum().backward()
    assert probs.grad.tolist() == [3.0, -1.0, 2.0]  # as if w were probs
    out, inp = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    mixed = mix(out, inp, torch.tensor([0.25, 1.0]))
    assert mixed.tolist() == [[0.75 * 1 + 0.25 * 10, 0.75 * 2 + 0.25 * 20], [30.0, 40.0]]
    rewards = skip_reward([torch.tensor([0.2, 0.4]), torch.tensor([0.6, 1.0])], 0.05)
    assert float(rewards) == pytest.approx(0.05 / (0.3 + 0.8))


GATE_PROBS = [0.8, 0.3, 0.6, 0.2]  # hard: skip blocks 0 and 2, run blocks 1 and 3


def fixed_gate_model():
    """A tiny BERT with smartbert heads whose gates output GATE_PROBS whatever they read."""
    model = tiny_model(head="smartbert", head_kwargs={"width": 16})
    strategy = SmartBERTStrategy()
    stages = strategy.stages(model)
    with torch.no_grad():
        for out, p in zip(model.gate.out, GATE_PROBS):
            out.weight.zero_()
            out.bias.fill_(math.log(p / (1 - p)))
    items = token_items(6, seed=3)
    batch = PaddingCollator()(items)
    labels = batch.pop("labels")
    return model, strategy, stages, batch, labels


def by_blocks(model, batch, weights):
    """Each block on every row, its output mixed with its input by the given weights:
    (block inputs, block outputs, final state, mask)."""
    state = model.backbone.start(**batch)
    h, mask = state.hidden, state.mask
    layer_mask = state.shared["layer_mask"]
    inputs, outputs = [], []
    for i, w in enumerate(weights):
        inputs.append(h)
        o = model.backbone.blocks[i](h, layer_mask)
        o = o[0] if isinstance(o, tuple) else o
        outputs.append(o)
        h = (1 - w) * o + w * h
    return inputs, outputs, h, mask


def test_stage_one_loss_hard_and_soft_against_the_blocks():
    model, s, stages, batch, labels = fixed_gate_model()
    project = getattr(model, PROJECTIONS).layers
    progress = stages[0].progress
    for hard in (True, False):
        # the special mode: soft for the first 60% of the planned steps, then hard
        progress.step, progress.max_steps = (7, 10) if hard else (2, 10)
        assert stages[0].step.hard_now() is hard
        weights = [float(p >= 0.5) for p in GATE_PROBS] if hard else GATE_PROBS
        ins, _, final, mask = by_blocks(model, batch, weights)
        ce = F.cross_entropy(model.heads[-1](final, mask), labels)
        contrast = sum(token_contrastive_loss(project[i](ins[i]), project[i + 1](ins[i + 1]),
                                              mask, s.t1, True) for i in range(3))
        want = (1 - s.eta1) * (ce + s.lam / sum(GATE_PROBS)) + s.eta1 * contrast
        model.zero_grad()
        loss, _ = stages[0].step(model, batch, labels)
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        loss.backward()
        # every gate learns: through the reward, and straight through the hard weights
        assert all(float(out.bias.grad.abs()) > 0 for out in model.gate.out)


def test_stage_two_trains_each_exit_on_its_own_blocks_output():
    model, s, stages, batch, labels = fixed_gate_model()
    project = getattr(model, PROJECTIONS).exits
    _, outs, _, mask = by_blocks(model, batch, [float(p >= 0.5) for p in GATE_PROBS])
    ce = sum(F.cross_entropy(model.heads[k](outs[k], mask), labels) for k in range(3))
    states = [project[k](model.heads[k].token_states(outs[k], mask)[0]) for k in range(3)]
    pairs = [token_contrastive_loss(states[k], states[k + 1], mask, s.t2, False)
             for k in range(2)]
    want = (1 - s.eta2) * ce + s.eta2 * (pairs[0] + pairs[1]) / 2
    loss, _ = stages[1].step(model, batch, labels)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()  # the frozen part ran without gradient
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.gate.parameters())


def test_special_training_mode_and_options():
    progress = TrainingProgress()
    first = FirstStage(SmartBERTStrategy(soft_fraction=0.6), progress)
    assert first.hard_now()  # outside training: the final (hard) setting
    progress.max_steps = 100
    assert [first.hard_now() for progress.step in (0, 59, 60, 99)] == [False, False, True, True]
    never = FirstStage(SmartBERTStrategy(hard_weight=False), progress)
    assert not never.hard_now()
    assert SmartBERTStrategy().options() == {
        "lam": 0.05, "eta1": 0.1, "eta2": 0.5, "t1": 0.5, "t2": 0.55, "skip_threshold": 0.5,
        "hard_weight": True, "soft_fraction": 0.6, "stage_args": None}


def test_clear_errors(tmp_path):
    with pytest.raises(ew.ConfigError, match="eta1"):
        get_strategy("smartbert", eta1=1.5)
    with pytest.raises(ew.ConfigError, match="t2"):
        get_strategy("smartbert", t2=0.0)
    with pytest.raises(ew.ConfigError, match="lam"):
        get_strategy("smartbert", lam=-1.0)
    # the second stage's contrastive loss reads the smartbert head's token states
    with pytest.raises(ew.ConfigError, match="head='smartbert'"):
        get_strategy("smartbert").stages(tiny_model())
    assert len(get_strategy("smartbert", eta2=0.0).stages(tiny_model())) == 2
    items = token_items(8)
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(num_labels=1, head="smartbert"), [dict(i, labels=0.5) for i in items],
              strategy="smartbert", output_dir=tmp_path, max_steps=1, **FAST)


def test_smartbert_end_to_end(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model(head="smartbert", head_kwargs={"width": 32})
    recorder = StageRecorder()
    # A small skip reward: on this easy task a large one makes every gate skip every block.
    train(model, items, strategy="smartbert", strategy_options={"lam": 0.001},
          output_dir=tmp_path / "run", max_steps=30, save_final=False, callbacks=[recorder],
          **FAST)
    b1, a1 = recorder.before["stage-1"], recorder.after["stage-1"]
    b2, a2 = recorder.before["stage-2"], recorder.after["stage-2"]
    moved = lambda b, a, prefix: [n for n in b if n.startswith(prefix)
                                  and not torch.equal(b[n], a[n])]
    # stage 1: backbone, gates, block projections and the final exit; not the others
    for prefix in ("backbone.", "gate.", f"{PROJECTIONS}.layers.", "heads.3."):
        assert moved(b1, a1, prefix), prefix
    for prefix in ("heads.0.", "heads.2.", f"{PROJECTIONS}.exits."):
        assert not moved(b1, a1, prefix), prefix
    # stage 2: only the internal exits and their projections
    changed = {n for n in b2 if not torch.equal(b2[n], a2[n])}
    assert changed and all(n.startswith(("heads.0.", "heads.1.", "heads.2.",
                                         f"{PROJECTIONS}.exits.")) for n in changed)
    assert moved(b2, a2, "heads.0.") and moved(b2, a2, f"{PROJECTIONS}.exits.")

    model.eval()
    loader = [PaddingCollator()(items[s : s + 16]) for s in range(0, 96, 16)]
    cache = collect_exit_logits(model, loader, progress=False)
    assert bool(cache.skipped.any())  # some rows skip some blocks
    accuracy = (cache.logits.argmax(-1) == cache.labels[:, None]).float().mean(0)
    assert float(accuracy[-1]) > 0.75 and float(accuracy[0]) > 0.6, accuracy
    offered = cache.logits[:, :-1][~cache.skipped[:, :-1]]
    policy = ew.get_policy("entropy", threshold=float(prediction_entropy(offered).median()))
    offline = replay(policy, cache, model.temperatures)
    live = [model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
            for b in loader]
    assert torch.equal(torch.cat([r.exit_index for r in live]), offline.exit_index)
    assert 0 < int((offline.exit_index < 3).sum()) < 96  # early exits and full-depth rows
    assert offline.accuracy > 0.7
    # saved without the training-only projections; the gate comes back with the heads
    model.save_pretrained(tmp_path / "saved")
    back = ew.MultiExitModel.from_pretrained(tmp_path / "saved")
    assert not hasattr(back, PROJECTIONS) and back.gate is not None
    again = back.early_exit(policy, **{k: v for k, v in loader[0].items() if k != "labels"})
    assert torch.equal(again.exit_index, live[0].exit_index)

"""Global Past-Future (``training/past_future.py`` with the ``past_future`` head): the
imitation loss and the whole objective against values computed by hand, where the imitation's
gradient goes, the reference's lower-layer freezing, misuse, and the method end to end on a
tiny BERT (runtime == replay on the trained model)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, get_strategy, train
from exitwise.training.past_future import (
    FreezeLowerStep,
    imitation_loss,
    past_future_loss,
)


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# Three exits, one row, D = 2: real states and the imitations of the later exits.
S = [[1.0, 0.0], [0.6, 0.8], [-1.0, 2.0]]
GUESS_0 = [[1.0, 1.0], [0.0, 3.0]]  # exit 0's guesses of exits 1 and 2
GUESS_1 = [[-2.0, 1.0]]  # exit 1's guess of exit 2


def test_imitation_loss_by_hand_and_targets_detached():
    """mean over source exits of the mean over (row, later exit) of 1 - cos."""
    want = ((1 - cos(GUESS_0[0], S[1])) + (1 - cos(GUESS_0[1], S[2]))) / 2
    want = (want + (1 - cos(GUESS_1[0], S[2]))) / 2
    states = [torch.tensor([s], requires_grad=True) for s in S]
    guesses = [torch.tensor([GUESS_0], requires_grad=True), torch.tensor([GUESS_1],
                                                                           requires_grad=True)]
    loss = imitation_loss(guesses, states)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert all(s.grad is None for s in states)  # the real states are targets only
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in guesses)
    with pytest.raises(ew.InputError, match="one per exit but the last"):
        imitation_loss(guesses[:1], states)


def test_objective_by_hand_depth_weighted_task_loss_plus_imitation_halved():
    z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    label = 1
    ce = [-math.log(math.exp(v[0][label]) / sum(math.exp(x) for x in v[0])) for v in
          [t.tolist() for t in z]]
    w = [1 / 6, 2 / 6, 3 / 6]  # depths 1, 2, 3 normalised: the reference's (i + 1) weights
    imit = ((1 - cos(GUESS_0[0], S[1])) + (1 - cos(GUESS_0[1], S[2]))) / 2
    imit = (imit + (1 - cos(GUESS_1[0], S[2]))) / 2
    want = (sum(wk * c for wk, c in zip(w, ce)) + imit) / 2
    out = ExitOutputs(logits=z, features=[torch.tensor([s]) for s in S])
    got = past_future_loss(out, torch.tensor([label]),
                           [torch.tensor([GUESS_0]), torch.tensor([GUESS_1])], w)
    assert float(got) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ew.InputError, match="return_features"):
        past_future_loss(ExitOutputs(logits=z), torch.tensor([label]), [], w)


def test_stage_loss_trains_imitators_and_sources_but_not_the_imitated_exits():
    model = tiny_model(head="past_future").train()
    stage = get_strategy("past_future").stages(model)[0]
    assert stage.forward_kwargs == {"return_features": True} and stage.step is None
    batch = PaddingCollator()(token_items(8))
    labels = batch.pop("labels")
    out = model(**batch, **stage.forward_kwargs)
    states = out.features
    # the imitation part alone: gradient into exit 0's imitators and pooler, none into the
    # pooler of the last exit, whose state is only a target
    imit = imitation_loss([model.heads[k].imitate(states[k]) for k in range(3)], states)
    imit.backward(retain_graph=True)
    assert model.heads[0].imitators[0].weight.grad.abs().sum() > 0
    assert model.heads[0].dense.weight.grad.abs().sum() > 0
    assert model.heads[3].dense.weight.grad is None
    # the stage's loss is the objective with the model's own imitations and depth weights
    want = past_future_loss(out, labels, [model.heads[k].imitate(states[k]) for k in range(3)],
                            [0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(stage.loss(out, labels), want)


def test_lower_layer_freezing_cuts_the_gradient_with_falling_probability():
    model = tiny_model(head="past_future").train()
    strategy = get_strategy("past_future", freeze_lower_layers=2)
    stage = strategy.stages(model)[0]
    step = stage.step
    assert isinstance(step, FreezeLowerStep) and step.lower == [0, 1]  # exits at depths 1, 2
    batch = PaddingCollator()(token_items(8))
    labels = batch.pop("labels")
    first_layer = next(model.backbone.model.encoder.layer[0].parameters())
    stage.progress.step, stage.progress.max_steps = 0, 10  # start: always cut
    assert step.scales() == [(0.0, 0.0), (0.0, 0.0), (1.0, 1.0), (1.0, 1.0)]
    loss, _ = step(model, dict(batch), labels)
    loss.backward()
    assert first_layer.grad is None or not first_layer.grad.any()
    model.zero_grad()
    stage.progress.step = 10  # end: never cut
    assert step.scales() == [(1.0, 1.0)] * 4
    loss, _ = step(model, dict(batch), labels)
    loss.backward()
    assert first_layer.grad.abs().sum() > 0
    stage.progress.step = 5  # halfway: each lower exit cut about half the time
    cuts = sum(step.scales()[0] == (0.0, 0.0) for _ in range(400))
    assert 150 < cuts < 250


def test_misuse_is_refused_clearly(tmp_path):
    with pytest.raises(ew.ConfigError, match="head='past_future'"):
        get_strategy("past_future").stages(tiny_model())  # pooler heads
    with pytest.raises(ew.ConfigError, match="at least two exits"):
        get_strategy("past_future").stages(tiny_model(head="past_future", layers=[4]))
    with pytest.raises(ew.ConfigError, match="freeze_lower_layers"):
        get_strategy("past_future", freeze_lower_layers=-1)
    items = token_items(8)
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(head="past_future", num_labels=1), [dict(i, labels=0.5) for i in items],
              strategy="past_future", output_dir=tmp_path / "reg", max_steps=1, **FAST)


def test_past_future_end_to_end_learns_imitates_and_exits_as_replayed(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model(head="past_future")
    batch = PaddingCollator()(items[:32])
    labels = batch.pop("labels")

    def imitation_now() -> float:
        model.eval()
        with torch.no_grad():
            s = model(**batch, return_features=True).features
            return float(imitation_loss([model.heads[k].imitate(s[k]) for k in range(3)], s))

    before = imitation_now()
    train(model, items, strategy="past_future", output_dir=tmp_path, max_steps=120,
          save_final=False, **FAST)
    assert imitation_now() < 0.5 * before  # the exits learned to imitate the later ones
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    acc = [float((z.argmax(-1) == labels).float().mean()) for z in out.logits]
    assert acc[-1] > 0.9 and min(acc) > 0.8, acc
    loader = [PaddingCollator()(items[s : s + 16]) for s in range(0, 96, 16)]
    cache = collect_exit_logits(model, loader, progress=False)
    # the median first-exit entropy: about half the rows leave at the first exit
    first = torch.softmax(cache.logits[:, 0].float() / model.temperatures[0], -1)
    policy = ew.get_policy("entropy", threshold=float(
        -(first * first.clamp_min(1e-12).log()).sum(-1).median()))
    offline = replay(policy, cache, model.temperatures)
    run = torch.cat([model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
                     .exit_index for b in loader])
    assert torch.equal(run, offline.exit_index)
    assert 0 < int((run < 3).sum()) and len(set(run.tolist())) >= 2, run  # mixed exits


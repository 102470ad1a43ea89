"""DACT-BERT (``training/dact.py``, ``policies/dact.py``, ``heads/dact.py``): the accumulated
answer and the ponder penalty, the halting inequality and the returned answer against values
computed by hand, the halting units, and the whole method end to end on a tiny BERT (training,
runtime == replay, save / load)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, train
from exitwise.training.dact import DACTStrategy, accumulated_answer, dact_loss

# 3 exits, 2 rows, 2 classes: logits = log(probabilities), so softmax gives them back.
PROBS = [
    [[0.6, 0.4], [0.9, 0.1]],  # exit 1: y_1 of row 0, row 1
    [[0.2, 0.8], [0.7, 0.3]],  # exit 2
    [[0.5, 0.5], [0.1, 0.9]],  # exit 3
]
HALT = [[0.5, 0.2], [0.4, 0.5], [0.9, 0.3]]  # h_n of row 0, row 1
# By hand, a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1}, p_n = h_n p_{n-1}, a_0 = 0, p_0 = 1:
#   row 0: a_1 = [.6, .4], p_1 = .5; a_2 = .5[.2, .8] + .5[.6, .4] = [.4, .6], p_2 = .2;
#          a_3 = .2[.5, .5] + .8[.4, .6] = [.42, .58], p_3 = .18
#   row 1: a_1 = [.9, .1], p_1 = .2; a_2 = .2[.7, .3] + .8[.9, .1] = [.86, .14], p_2 = .1;
#          a_3 = .1[.1, .9] + .9[.86, .14] = [.784, .216], p_3 = .03
ANSWERS = [[[0.6, 0.4], [0.9, 0.1]], [[0.4, 0.6], [0.86, 0.14]], [[0.42, 0.58], [0.784, 0.216]]]
MASSES = [[0.5, 0.2, 0.18], [0.2, 0.1, 0.03]]


def hand_outputs(requires_grad: bool = False) -> ExitOutputs:
    logits = [torch.tensor(p).log() for p in PROBS]
    scores = [torch.tensor(h, requires_grad=requires_grad) for h in HALT]
    return ExitOutputs(logits=logits, scores=scores)


def test_accumulated_answer_and_ponder_penalty_by_hand():
    answer, masses = accumulated_answer(hand_outputs())
    torch.testing.assert_close(answer, torch.tensor(ANSWERS[-1]))
    torch.testing.assert_close(masses, torch.tensor(MASSES))
    labels = torch.tensor([1, 0])
    nll = -(math.log(0.58) + math.log(0.784)) / 2
    ponder = ((0.5 + 0.2 + 0.18) + (0.2 + 0.1 + 0.03)) / 2
    assert float(dact_loss(0.0)(hand_outputs(), labels)) == pytest.approx(nll, rel=1e-5)
    assert float(dact_loss(0.1)(hand_outputs(), labels)) == pytest.approx(nll + 0.1 * ponder,
                                                                         rel=1e-5)
    # every halting value gets a gradient; the last one only through the ponder penalty
    outputs = hand_outputs(requires_grad=True)
    dact_loss(0.1)(outputs, labels).backward()
    last = outputs.scores[-1].grad
    assert all(h.grad is not None for h in outputs.scores)
    # d(0.1 * mean_b p_3)/dh_3 = 0.1 * p_2 / 2, per row
    torch.testing.assert_close(last, torch.tensor([0.1 * 0.2 / 2, 0.1 * 0.1 / 2]))


def test_halting_inequality_by_hand():
    """a[c*] (1 - p)^d - a[c2] - d p > margin, d = exits still to come. At exit 1 (d = 2):
    row 0: .6 * .5^2 - .4 - 2 * .5 = -1.25 (goes on); row 1: .9 * .8^2 - .1 - 2 * .2 = 0.076
    (halts). At exit 2 (d = 1): row 0: .6 * .8 - .4 - .2 = -0.12, still goes on."""
    logits = [torch.tensor(p).log() for p in PROBS]
    scores = [torch.tensor(h) for h in HALT]

    def first_exit(margin: float):
        policy = ew.get_policy("dact", margin=margin)
        return policy.decide(0, 3, logits[0], policy.init_state(2), scores=scores[0])

    done, state = first_exit(0.0)
    assert done.tolist() == [False, True]
    torch.testing.assert_close(state["accumulated"], torch.tensor(ANSWERS[0]))
    torch.testing.assert_close(state["remaining"], torch.tensor([0.5, 0.2]))
    assert first_exit(0.075)[0].tolist() == [False, True]
    assert first_exit(0.077)[0].tolist() == [False, False]  # a margin above the gap
    assert first_exit(-1.26)[0].tolist() == [True, True]  # a relaxation past row 0's gap
    assert first_exit(-1.24)[0].tolist() == [False, True]
    policy = ew.get_policy("dact")
    done2, _ = policy.decide(1, 3, logits[1][:1], policy.keep(state, torch.tensor([0])),
                             scores=scores[1][:1])
    assert done2.tolist() == [False]  # -0.12
    # margin 1 never halts early (the gap is below 1)
    assert not ew.get_policy("dact", margin=1.0).decide(
        0, 3, torch.tensor([[20.0, -20.0]]), ew.get_policy("dact").init_state(1),
        scores=torch.tensor([1e-6]))[0].item()


def test_returned_output_is_the_accumulated_answer():
    """output_logits(n) = log a_n from the state before exit n's decision, also at the last
    exit (where the executor decides nothing)."""
    logits = [torch.tensor(p).log() for p in PROBS]
    policy = ew.get_policy("dact")
    state = policy.init_state(2)
    for k in range(3):
        out = policy.output_logits(k, 3, logits[k], state)
        torch.testing.assert_close(out.exp(), torch.tensor(ANSWERS[k]))
        if k < 2:
            _, state = policy.decide(k, 3, logits[k], state, scores=torch.tensor(HALT[k]))
    assert policy.transforms_output and policy.uses_scores


def test_misuse_raises_clear_errors(tmp_path):
    policy = ew.get_policy("dact")
    with pytest.raises(ew.InputError, match="scores"):
        policy.decide(0, 3, torch.zeros(2, 2), policy.init_state(2))
    with pytest.raises(ew.ConfigError, match="margin"):
        ew.get_policy("dact", margin=1.5)
    with pytest.raises(ew.ConfigError, match="tau"):
        DACTStrategy(tau=-1.0)
    with pytest.raises(ew.ConfigError, match="scorer"):
        dact_loss(1e-3)(ExitOutputs(logits=hand_outputs().logits), torch.tensor([0, 1]))
    # regression: refused by the training loop, the strategy, the loss and the policy
    items = [dict(i, labels=0.5) for i in token_items(8)]
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(num_labels=1), items, strategy="dact", output_dir=tmp_path, max_steps=1,
              **FAST)
    with pytest.raises(ew.ConfigError, match="regression"):
        DACTStrategy().stages(tiny_model(num_labels=1))
    reg = ExitOutputs(logits=[torch.zeros(2, 1)] * 3, scores=[torch.full((2,), 0.5)] * 3)
    with pytest.raises(ew.ConfigError, match="regression"):
        dact_loss(1e-3)(reg, torch.tensor([0.5, 1.0]))
    with pytest.raises(ew.ConfigError, match="classification"):
        policy.check_task("regression")


def test_halting_units_one_per_exit_any_width():
    """h_k = sigmoid(w_k . f_k + b_k) on exit k's feature (the input of its classifier layer),
    one unit per exit, so exits of different widths work; the bias starts at -1."""
    model = tiny_model(head=["fastbert", "linear", "linear", "linear"],
                       head_kwargs=[{"width": 16}, {}, {}, {}]).eval()
    scorer = model.attach_scorer("dact")
    assert [u.in_features for u in scorer.units] == [16, 32, 32, 32]
    assert all(u.bias.item() == -1.0 for u in scorer.units)
    batch = PaddingCollator()(token_items(4))
    batch.pop("labels")
    with torch.no_grad():
        out = model(return_features=True, **batch)
    for k in range(model.num_exits):
        unit = scorer.units[k]
        want = torch.sigmoid(out.features[k] @ unit.weight[0] + unit.bias)
        torch.testing.assert_close(out.scores[k], want)
    assert scorer.scorer_flops(0, 3).tolist() == [32.0] * 3


def test_dact_end_to_end_runtime_equals_replay_and_round_trip(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model()
    result = train(model, items, strategy="dact", output_dir=tmp_path, max_steps=30,
                   strategy_options={"tau": 1e-3}, save_final=False, **FAST)
    assert [s.name for s in result.stages] == ["stage-1"] and model.backbone_tuned
    model.eval()
    loader = [PaddingCollator()(items[s : s + 16]) for s in range(0, 96, 16)]
    with torch.no_grad():
        outs = [model(**{k: v for k, v in b.items() if k != "labels"}) for b in loader]
    # the accumulated answer learned the task
    final = torch.cat([accumulated_answer(o)[0] for o in outs])
    labels = torch.tensor([i["labels"] for i in items])
    assert float((final.argmax(-1) == labels).float().mean()) > 0.75
    # halting units moved from their start
    assert any(u.bias.item() != -1.0 for u in model.scorer.units)

    cache = collect_exit_logits(model, loader, progress=False)
    policy = ew.get_policy("dact")
    offline = replay(policy, cache, model.temperatures)
    live = [model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
            for b in loader]
    exits = torch.cat([r.exit_index for r in live])
    assert torch.equal(exits, offline.exit_index)
    returned = torch.cat([r.logits for r in live])
    torch.testing.assert_close(returned, offline.outputs, atol=1e-5, rtol=1e-5)
    # what a row returns is its accumulated answer at its exit (a_E for rows that ran on)
    answers = torch.stack([torch.cat([accumulated_answer(ExitOutputs(
        logits=o.logits[: k + 1], scores=o.scores[: k + 1]))[0] for o in outs])
        for k in range(model.num_exits)], dim=1)
    rows = torch.arange(len(items))
    torch.testing.assert_close(returned.exp(), answers[rows, exits], atol=1e-5, rtol=1e-5)
    # the paper's rule halts only where the answer can no longer change: same predictions as
    # running every exit
    assert torch.equal(offline.predictions, final.argmax(-1))
    assert bool((exits < model.num_exits - 1).any())  # (so that this says something)
    # a relaxed margin (below the paper's 0) never halts later, and here halts earlier
    relaxed = replay(policy.with_param(-1.0), cache, model.temperatures).exit_index
    assert bool((relaxed <= exits).all()) and float(relaxed.float().mean()) < float(
        exits.float().mean())
    # a larger ponder penalty learns lower halting values, so rows halt earlier
    costly = tiny_model()
    train(costly, items, strategy="dact", output_dir=tmp_path / "tau", max_steps=30,
          strategy_options={"tau": 0.1}, save_final=False, **FAST)
    cache_costly = collect_exit_logits(costly.eval(), loader, progress=False)
    assert float(cache_costly.scores.mean()) < float(cache.scores.mean())
    assert float(replay(policy, cache_costly).exit_index.float().mean()) < float(
        exits.float().mean())

    # saved and loaded without pickle, halting units included, bit for bit
    model.save_pretrained(tmp_path / "saved", save_backbone=True)
    again = ew.MultiExitModel.from_pretrained(tmp_path / "saved")
    assert again.scorer.registered_name == "dact"
    for (n, p), (_, q) in zip(model.scorer.state_dict().items(),
                              again.scorer.state_dict().items()):
        assert torch.equal(p, q), n
    cache2 = collect_exit_logits(again, loader, progress=False)
    assert torch.equal(cache2.scores, cache.scores)
    assert torch.equal(replay(policy, cache2).exit_index, offline.exit_index)

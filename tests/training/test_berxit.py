"""BERxiT: the alternating schedule, the learning-to-exit targets and loss, the lte exit rule,
and the exit scorer through training, saving, the executor and the replay."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, token_items, tiny_model

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, TrainingProgress, train
from exitwise.training.berxit import AlternatingLoss, certainty_targets, learning_to_exit_loss


def ce(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_alternating_loss_by_hand():
    z0 = [[2.0, 0.0], [0.0, 1.0]]
    z1 = [[0.5, 0.0], [1.0, 3.0]]
    outputs = ExitOutputs(logits=[torch.tensor(z0), torch.tensor(z1)])
    labels = torch.tensor([0, 0])
    final = (ce(z1[0], 0) + ce(z1[1], 0)) / 2
    first = (ce(z0[0], 0) + ce(z0[1], 0)) / 2
    progress = TrainingProgress(max_steps=10)
    loss = AlternatingLoss(progress)
    for step, expected in [(0, final), (1, final + first), (2, final), (7, final + first)]:
        progress.step = step
        assert math.isclose(float(loss(outputs, labels)), expected, rel_tol=1e-6), step
    # outside training (no planned steps) it reports every exit's loss
    assert math.isclose(float(AlternatingLoss(TrainingProgress())(outputs, labels)),
                        final + first, rel_tol=1e-6)


def test_even_steps_send_no_gradient_to_the_early_exits():
    model = tiny_model()
    batch = PaddingCollator()(token_items(8))
    labels = batch.pop("labels")
    progress = TrainingProgress(max_steps=4)
    loss_fn = AlternatingLoss(progress)
    for step, reaches_first in [(0, False), (1, True)]:
        model.zero_grad(set_to_none=True)
        progress.step = step
        loss_fn(model(**batch), labels).backward()
        grad = model.heads[0].classifier.weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == reaches_first, step
        assert bool(model.heads[-1].classifier.weight.grad.abs().sum() > 0)


def test_certainty_targets_and_loss_by_hand():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 2.0], [0.0, 1.0]])]
    labels = torch.tensor([0, 1])
    # exit 0: row 0 right, row 1 right; exit 1: row 0 wrong, row 1 right
    assert certainty_targets(logits, labels).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    scores = [torch.tensor([0.9, 0.6]), torch.tensor([0.2, 0.7])]
    expected = ((0.9 - 1) ** 2 + (0.2 - 0) ** 2 + (0.6 - 1) ** 2 + (0.7 - 1) ** 2) / 4
    got = learning_to_exit_loss(ExitOutputs(logits=logits, scores=scores), labels)
    assert math.isclose(float(got), expected, rel_tol=1e-6)
    # regression: 1 - tanh|y_hat - y|
    reg = [torch.tensor([[1.5], [3.0]])]
    y = torch.tensor([1.0, 3.0])
    want = [1 - math.tanh(0.5), 1.0]
    assert torch.allclose(certainty_targets(reg, y)[:, 0], torch.tensor(want))
    with pytest.raises(ew.ConfigError, match="scorer"):
        learning_to_exit_loss(ExitOutputs(logits=logits), labels)


def test_lte_rule_is_certainty_at_least_the_threshold():
    policy = ew.get_policy("lte", threshold=0.9)
    logits = torch.zeros(3, 2)
    done, _ = policy.decide(0, 3, logits, {}, scores=torch.tensor([0.95, 0.9, 0.5]))
    assert done.tolist() == [True, True, False]
    with pytest.raises(ew.InputError, match="scores"):
        policy.decide(0, 3, logits, {})
    with pytest.raises(ew.ConfigError):
        ew.get_policy("lte", threshold=1.5)


def test_scorer_needs_one_feature_width_and_policies_need_a_scorer():
    # the fastbert head's classifier reads its 16-wide projection, the linear heads 32
    model = tiny_model(head=["fastbert", "linear", "linear", "linear"],
                       head_kwargs=[{"width": 16}, {}, {}, {}])
    assert [ew.heads.feature_width(h) for h in model.heads] == [16, 32, 32, 32]
    with pytest.raises(ew.ConfigError, match="one width"):
        model.attach_scorer("lte")
    plain = tiny_model()
    batch = PaddingCollator()(token_items(4))
    batch.pop("labels")
    with pytest.raises(ew.InputError, match="scorer"):
        plain.early_exit(ew.get_policy("lte"), **batch)
    cache = collect_exit_logits(plain, [batch], progress=False)
    with pytest.raises(ew.InputError, match="scores"):
        replay(ew.get_policy("lte"), cache)


def _train_berxit(tmp_path, num_labels: int = 2):
    items = token_items(96, seed=0)
    if num_labels == 1:  # a regression target: 2.0 with the marker, else 0.0
        items = [dict(i, labels=2.0 * float(i["labels"])) for i in items]
    model = tiny_model(num_labels=num_labels)
    # one linear layer on fixed features: a larger step size for the learning-to-exit stage
    result = train(model, items, strategy="berxit", output_dir=tmp_path, max_steps=40,
                   strategy_options={"stage_args": [{}, {"learning_rate": 5e-2}]},
                   save_final=False, **FAST)
    return model.eval(), items, result


@pytest.mark.parametrize("num_labels", [2, 1])
def test_berxit_end_to_end_runtime_equals_replay_and_round_trip(tmp_path, num_labels):
    model, items, result = _train_berxit(tmp_path, num_labels)
    assert [s.name for s in result.stages] == ["stage-1", "stage-2"]
    loader = [PaddingCollator()(items[s : s + 16]) for s in range(0, 96, 16)]
    cache = collect_exit_logits(model, loader, progress=False)
    assert cache.scores is not None and cache.scores.shape == (96, model.num_exits)
    # from its random start (about 0.5) the certainty learned the level of the targets
    targets = certainty_targets(list(cache.logits.unbind(1)), cache.labels)
    assert abs(float(cache.scores.mean()) - float(targets.mean())) < 0.1
    assert abs(float(targets.mean()) - 0.5) > 0.1  # (so that this says something)
    # a threshold that splits the rows: runtime == replay, predictions included
    threshold = float(cache.scores[:, 0].median())
    policy = ew.get_policy("lte", threshold=threshold)
    offline = replay(policy, cache, model.temperatures)
    assert bool((offline.exit_index < model.num_exits - 1).any())
    live = [model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
            for b in loader]
    assert torch.equal(torch.cat([r.exit_index for r in live]), offline.exit_index)
    # (a regression value may differ by round-off once the batch has shrunk)
    torch.testing.assert_close(torch.cat([r.predictions for r in live]), offline.predictions,
                               atol=1e-5, rtol=1e-5)
    # saved and loaded without pickle, scorer included, bit for bit
    model.save_pretrained(tmp_path / "saved", save_backbone=True)
    again = ew.MultiExitModel.from_pretrained(tmp_path / "saved")
    for (n, p), (_, q) in zip(model.scorer.state_dict().items(),
                              again.scorer.state_dict().items()):
        assert torch.equal(p, q), n
    cache2 = collect_exit_logits(again, loader, progress=False)
    assert torch.equal(cache2.scores, cache.scores)
    # the cache keeps its scores through save / load
    cache.save(tmp_path / "cache.safetensors")
    loaded = ew.analysis.ExitLogitsCache.load(tmp_path / "cache.safetensors")
    assert torch.equal(loaded.scores, cache.scores)

"""CascadeBERT's difficulty-aware objective (``training/cascadebert.py``): the margin term and
the whole loss against values computed by hand, which rows count as hard (own mistakes, or
trained difficulty models), the strategy training a member end to end, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.errors import ConfigError
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, get_strategy, train
from exitwise.training.cascadebert import (
    cascadebert_loss,
    difficulty_margin_loss,
    own_difficulty,
    top_confidence,
)


def softmax(v):
    z = sum(math.exp(x) for x in v)
    return [math.exp(x) / z for x in v]


def test_margin_term_by_hand_all_pairs_and_sampled():
    """easy confidences 0.9, 0.6; hard 0.7, 0.3; margin 0.5:
    all pairs: max(0, .5-(.9-.7))=.3, max(0, .5-(.9-.3))=0, max(0, .5-(.6-.7))=.6,
    max(0, .5-(.6-.3))=.2 -> mean 0.275."""
    conf = torch.tensor([0.9, 0.7, 0.6, 0.3])
    hard = torch.tensor([False, True, False, True])
    assert float(difficulty_margin_loss(conf, hard, 0.5, "all")) == pytest.approx(0.275)
    # sampled (the reference): one hard partner per easy row; with a single hard row (0.7)
    # the draw is forced: mean(.3, .6) = .45
    one_hard = torch.tensor([False, True, False, False])
    assert float(difficulty_margin_loss(conf, one_hard, 0.5, "sampled")) == pytest.approx(
        (0.3 + 0.6 + max(0.0, 0.5 - (0.3 - 0.7))) / 3)
    # each sampled draw is one of the per-easy-row terms; their average tends to "all"
    g = torch.Generator().manual_seed(0)
    draws = [float(difficulty_margin_loss(conf, hard, 0.5, "sampled", generator=g))
             for _ in range(400)]
    assert {round(d, 6) for d in draws} == {0.45, 0.25, 0.3, 0.1}
    assert sum(draws) / len(draws) == pytest.approx(0.275, abs=0.02)
    # no easy or no hard row: nothing to rank, 0 (still differentiable)
    c = conf.clone().requires_grad_(True)
    zero = difficulty_margin_loss(c, torch.zeros(4, dtype=torch.bool), 0.5)
    zero.backward()
    assert float(zero.detach()) == 0.0 and c.grad is not None
    assert float(difficulty_margin_loss(conf, torch.ones(4, dtype=torch.bool), 0.5)) == 0.0
    # the gradient raises easy confidences and lowers hard ones
    c = conf.clone().requires_grad_(True)
    difficulty_margin_loss(c, hard, 0.5, "all").backward()
    assert c.grad[0] < 0 and c.grad[2] < 0 and c.grad[1] > 0 and c.grad[3] >= 0


def test_whole_loss_by_hand_with_own_mistakes_as_difficulty():
    """Rows 0, 1 are right (easy), row 2 wrong (hard); weight 0.5, margin 0.5."""
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.5, 0.0]])
    y = torch.tensor([0, 1, 1])
    assert own_difficulty(z, y).tolist() == [False, False, True]
    p = [softmax(r) for r in z.tolist()]
    conf = [max(r) for r in p]
    torch.testing.assert_close(top_confidence(z), torch.tensor(conf))
    ce = -(math.log(p[0][0]) + math.log(p[1][1]) + math.log(p[2][1])) / 3
    dar = (max(0.0, 0.5 - (conf[0] - conf[2])) + max(0.0, 0.5 - (conf[1] - conf[2]))) / 2
    out = ExitOutputs(logits=[torch.zeros(3, 2), z])  # only the final exit counts
    assert float(cascadebert_loss(out, y, 0.5, 0.5)) == pytest.approx(ce + 0.5 * dar, rel=1e-6)
    assert float(cascadebert_loss(out, y, 0.5, 0.0)) == pytest.approx(ce, rel=1e-6)
    # given difficulty overrides the model's own: only row 1 hard
    hard = torch.tensor([False, True, False])
    dar2 = (max(0.0, 0.5 - (conf[0] - conf[1])) + max(0.0, 0.5 - (conf[2] - conf[1]))) / 2
    assert float(cascadebert_loss(out, y, 0.5, 0.5, "all", hard)) == pytest.approx(
        ce + 0.5 * dar2, rel=1e-6)
    # the strategy's stage computes the same loss on the final exit
    (stage,) = get_strategy("cascadebert", pairs="all").stages(tiny_model(layers=[4]))
    assert float(stage.loss(ExitOutputs(logits=[z]), y)) == pytest.approx(ce + 0.5 * dar)


def test_strategy_trains_backbone_and_final_head_only(tmp_path):
    model = tiny_model(layers=[4])  # one exit, the final one: a complete cascade member
    (stage,) = get_strategy("cascadebert").stages(model)
    names = stage.trainable_names(model)
    assert any(n.startswith("backbone.") for n in names)
    assert {n.split(".")[1] for n in names if n.startswith("heads.")} == {"0"}
    # earlier exits would stay untrained (exitwise train --strategy cascadebert left them
    # random and calibrated policies on them): refused
    with pytest.raises(ConfigError, match="untrained"):
        get_strategy("cascadebert").stages(tiny_model(layers=[2]))
    items = token_items(96, seed=0)
    member = tiny_model(layers=[4])
    train(member, items, strategy="cascadebert", output_dir=tmp_path, max_steps=30,
          save_final=False, **FAST)
    member.eval()
    batch = PaddingCollator()(items[:48])
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = member(**batch).logits[-1]
    assert float((logits.argmax(-1) == labels).float().mean()) > 0.75


def test_difficulty_models_judge_the_rows(tmp_path):
    items = token_items(48, seed=1)
    judge = tiny_model(seed=3, layers=[4])
    batch = PaddingCollator()(items[:16])
    labels = batch.pop("labels")
    with torch.no_grad():
        judge_pred = judge.full_depth(**batch).argmax(-1)
    strategy = get_strategy("cascadebert", difficulty_models=[judge])
    member = tiny_model(seed=0, layers=[4])
    (stage,) = strategy.stages(member)
    hard = strategy.judged_difficulty(batch, labels, strategy.judges(member))
    assert hard.tolist() == (judge_pred != labels).tolist()
    # two judges: hard when at least half of them err (one of two is enough)
    other = tiny_model(seed=4, layers=[4])
    with torch.no_grad():
        other_pred = other.full_depth(**batch).argmax(-1)
    both = get_strategy("cascadebert", difficulty_models=[judge, other])
    got = both.judged_difficulty(batch, labels, both.judges(member))
    assert got.tolist() == ((judge_pred != labels) | (other_pred != labels)).tolist()
    # the training step uses the judges' difficulty, not the member's own
    member.train()
    torch.manual_seed(0)
    loss_a, out_a = stage.step(member, dict(batch), labels)
    torch.manual_seed(0)
    want = cascadebert_loss(out_a, labels, 0.5, 0.5, "sampled", hard)
    assert float(loss_a.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    own = own_difficulty(out_a.logits[-1], labels)
    assert own.tolist() != hard.tolist()  # so the check above tells the two apart
    torch.manual_seed(0)
    with_own = cascadebert_loss(out_a, labels, 0.5, 0.5, "sampled", own)
    assert float(with_own.detach()) != pytest.approx(float(loss_a.detach()), rel=1e-6)
    loss_a.backward()  # judged difficulty does not break autograd
    # and a short run trains with it; options stay JSON-able
    train(tiny_model(layers=[4]), items, strategy="cascadebert",
          strategy_options={"difficulty_models": [judge]}, output_dir=tmp_path / "j",
          max_steps=3, save_final=False, **FAST)
    assert strategy.options()["difficulty_models"] == ["<in-memory MultiExitModel>"]


def test_difficulty_model_from_a_folder(tmp_path):
    judge = tiny_model(seed=3, layers=[4])
    judge.save_pretrained(tmp_path / "judge", save_backbone=True)
    strategy = get_strategy("cascadebert", difficulty_models=str(tmp_path / "judge"))
    (loaded,) = strategy.judges(tiny_model(layers=[4]))
    batch = PaddingCollator()(token_items(8, seed=2))
    batch.pop("labels")
    torch.testing.assert_close(loaded.full_depth(**batch), judge.eval().full_depth(**batch))
    assert strategy.options()["difficulty_models"] == [str(tmp_path / "judge")]
    with pytest.raises(ew.ConfigError, match="3 labels"):
        get_strategy("cascadebert", difficulty_models=[tiny_model(num_labels=3)]).stages(
            tiny_model(layers=[4]))


def test_clear_errors(tmp_path):
    items = token_items(8)
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(num_labels=1, layers=[4]), [dict(i, labels=0.5) for i in items],
              strategy="cascadebert", output_dir=tmp_path / "reg", max_steps=1, **FAST)
    with pytest.raises(ew.ConfigError, match="regression"):
        cascadebert_loss(ExitOutputs(logits=[torch.zeros(2, 1)]), torch.zeros(2))
    with pytest.raises(ew.ConfigError, match="margin"):
        get_strategy("cascadebert", margin=2.0)
    with pytest.raises(ew.ConfigError, match="weight"):
        get_strategy("cascadebert", weight=-1)
    with pytest.raises(ew.ConfigError, match="pairs"):
        get_strategy("cascadebert", pairs="some")
    with pytest.raises(ew.ConfigError, match="empty"):
        get_strategy("cascadebert", difficulty_models=[])
    with pytest.raises(ew.ConfigError, match="MultiExitModel"):
        get_strategy("cascadebert", difficulty_models=[torch.nn.Linear(2, 2)]).stages(
            tiny_model(layers=[4]))

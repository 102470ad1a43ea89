"""E2CM (``heads/class_means.py``, ``training/e2cm.py``, ``policies/e2cm.py``,
``calibration/e2cm.py``): class means and their normalising scales against values computed by
hand, the negated-distance logits, the unsupervised (predicted-label) variant, save/load bit
for bit, the strict per-exit exit rule, the convex-hull operating points, and the whole method
end to end on a tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_encoder
from helpers.trainkit import token_items
from torch import nn

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, collect_exit_logits, replay
from exitwise.calibration.e2cm import fit_e2cm_policy
from exitwise.training import PaddingCollator
from exitwise.training.e2cm import fit_class_means

# Three 2-d rows; exit 0 (class means) reads them as they are (identity blocks).
X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
Y = torch.tensor([0, 0, 1])


def identity_model(classifier: nn.Module | None = None) -> ew.MultiExitModel:
    """Two identity blocks; a class_means exit after each, or after the first with
    ``classifier`` (an own classifier) as the final exit."""
    backbone = ew.SequentialBackbone([nn.Identity(), nn.Identity()], example=torch.zeros(1, 2),
                                     classifier=classifier)
    return ew.attach_exits(backbone, layers="all", head="class_means", num_labels=2,
                           dropout=0.0).eval()


def test_class_means_scales_and_logits_by_hand():
    model = identity_model()
    fit = fit_class_means(model, [{"pixel_values": X, "labels": Y}], progress=False)
    assert fit.exits == [0, 1] and fit.class_counts == [2, 1] and fit.num_rows == 3
    layer = model.heads[0].classifier
    # means: class 0 = mean([0,0], [2,0]) = [1, 0]; class 1 = [0, 4]
    torch.testing.assert_close(layer.means, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    # scales: mean distance of ALL rows to each mean
    s0 = (1.0 + 1.0 + math.sqrt(17.0)) / 3  # [0,0], [2,0], [0,4] to [1,0]
    s1 = (4.0 + math.sqrt(20.0) + 0.0) / 3  # ... to [0,4]
    torch.testing.assert_close(layer.scales, torch.tensor([s0, s1]))
    assert layer.counts.tolist() == [2, 1] and model.heads[0].fitted
    # a new row [1, 1]: distances 1 and sqrt(10); logits are their negated, scaled values
    out = model(pixel_values=torch.tensor([[1.0, 1.0]]))
    want = torch.tensor([[-1.0 / s0, -math.sqrt(10.0) / s1]])
    torch.testing.assert_close(out.logits[0], want)
    torch.testing.assert_close(out.logits[1], want)  # identity: the same features at exit 1
    assert model.training is False


def test_tokens_are_pooled_over_real_tokens_or_the_first_one():
    head = ew.build_head("class_means", 2, 2, dropout=0.0)
    with torch.no_grad():
        head.classifier.means.copy_(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
        head.classifier.scales.copy_(torch.tensor([2.0, 0.5]))
    tokens = torch.tensor([[[0.0, 0.0], [2.0, 2.0], [99.0, 99.0]]])  # last token is padding
    mask = torch.tensor([[1, 1, 0]])
    # mean of the real tokens: [1, 1] -> distances 1 and sqrt(10)
    torch.testing.assert_close(head(tokens, mask), torch.tensor([[-0.5, -math.sqrt(10) / 0.5]]))
    first = ew.build_head("class_means", 2, 2, pooling="first")
    first.load_state_dict(head.state_dict())
    # first token [0, 0] -> distances 1 and 4
    torch.testing.assert_close(first(tokens, mask), torch.tensor([[-0.5, -8.0]]))
    flops = head.head_flops(mask, 1)
    assert float(flops[0]) == 2 * 2 + 2 * (3 * 2 + 2)  # 2 tokens x 2 wide, then 2 classes
    with pytest.raises(ew.ConfigError, match="pooling"):
        ew.build_head("class_means", 2, 2, pooling="max")


def test_unsupervised_means_follow_the_final_exits_predictions():
    """labels="predicted": the classes are the final classifier's arg-max, no label is read."""
    own = nn.Linear(2, 2)
    with torch.no_grad():  # predicts class 1 iff x1 > x0 + 0.5
        own.weight.copy_(torch.eye(2))
        own.bias.copy_(torch.tensor([0.5, 0.0]))
    model = identity_model(classifier=own)
    assert [type(h).registered_name for h in model.heads] == ["class_means", "native"]
    rows = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [1.0, 3.0]])
    fit = fit_class_means(model, [{"pixel_values": rows}], labels="predicted", progress=False)
    # predictions 0, 0, 1, 1 -> means [1, 0] and [0.5, 3.5]
    assert fit.exits == [0] and fit.class_counts == [2, 2]
    torch.testing.assert_close(model.heads[0].classifier.means,
                               torch.tensor([[1.0, 0.0], [0.5, 3.5]]))
    assert torch.equal(own.weight, torch.eye(2))  # the own classifier is untouched


def test_fitted_heads_save_and_load_bit_identical(tmp_path):
    encoder = tiny_encoder("bert")
    model = ew.attach_exits(encoder, layers="all", head="class_means", num_labels=2,
                            dropout=0.0)
    items = token_items(32, seed=1)
    loader = [PaddingCollator()(items[s:s + 16]) for s in (0, 16)]
    fit_class_means(model, loader, progress=False)
    model.save_pretrained(tmp_path)
    again = ew.MultiExitModel.from_pretrained(tmp_path, backbone=encoder)
    for a, b in zip(model.heads, again.heads):
        for name, buf in a.classifier.named_buffers():
            assert torch.equal(buf, getattr(b.classifier, name)), name
    batch = {k: v for k, v in loader[0].items() if k != "labels"}
    with torch.no_grad():
        before, after = model.eval()(**batch), again(**batch)
    for x, y in zip(before.logits, after.logits):
        assert torch.equal(x, y)


def test_e2cm_rule_is_strictly_above_each_exits_own_threshold():
    policy = ew.get_policy("e2cm", cost=0.5, costs=[0.5, 0.8],
                           thresholds=[[0.5, 0.9], [0.95, 0.99]])
    assert policy.active_thresholds == [0.5, 0.9]
    # [0, 0] -> top probability exactly 0.5: not above 0.5 (confidence exits at equality)
    logits = torch.tensor([[0.0, 0.0], [math.log(0.6), math.log(0.4)]])
    done, _ = policy.decide(0, 3, logits, {})
    assert done.tolist() == [False, True]
    assert ew.get_policy("confidence", threshold=0.5).decide(0, 3, logits, {})[0].tolist() == [
        True, True]
    # exit 1 has its own threshold 0.9
    assert policy.decide(1, 3, torch.tensor([[math.log(0.85), math.log(0.15)]]), {})[
        0].tolist() == [False]
    # a cost between fitted points takes the largest one below it
    assert policy.with_param(0.79).active_thresholds == [0.5, 0.9]
    assert policy.with_param(1.0).active_thresholds == [0.95, 0.99]
    assert policy.grid(3) == [0.5, 0.8]
    with pytest.raises(ew.ConfigError, match="below every fitted"):
        policy.with_param(0.4)
    with pytest.raises(ew.ConfigError, match="fitted for 3 exits"):
        policy.decide(0, 4, logits, {})
    unfitted = ew.get_policy("e2cm")
    assert not unfitted.decide(0, 3, torch.tensor([[9.0, 0.0]]), {})[0].any()
    for bad in ({"cost": 0.5}, {"costs": [0.5]}, {"costs": [0.8, 0.5], "thresholds": [[1], [1]]},
                {"costs": [0.5], "thresholds": [["x"]]}):
        with pytest.raises(ew.ConfigError, match="e2cm"):
            ew.get_policy("e2cm", **bad)


def _cache() -> ExitLogitsCache:
    """4 rows, 3 exits, 2 classes, exit costs 1, 2, 3 (full depth 3). Top probabilities and
    whether the top class is the label:
        exit 0: 0.9 right, 0.6 wrong, 0.8 right, 0.55 wrong
        exit 1: 0.95 right, 0.9 right, 0.7 wrong, 0.6 wrong
        exit 2: always right."""
    top = torch.tensor([[0.9, 0.95, 0.99], [0.6, 0.9, 0.99], [0.8, 0.7, 0.99],
                        [0.55, 0.6, 0.99]])
    right = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    labels = torch.tensor([0, 1, 0, 1])
    top_class = torch.where(right, labels[:, None], 1 - labels[:, None])  # (N, E)
    probs = torch.stack([1 - top, top], -1)  # class 1 holds the top probability ...
    swap = top_class == 0  # ... unless the top class is 0
    probs = torch.where(swap[..., None], probs.flip(-1), probs)
    costs = torch.tensor([1.0, 2.0, 3.0]).expand(4, 3)
    return ExitLogitsCache(probs.log(), labels, costs, torch.full((4,), 3.0), [1, 2, 3])


def test_operating_points_are_the_upper_hull_of_the_candidates():
    cache = _cache()
    candidates = {
        "A": [0.85, 0.85],  # exits 0,1,2,2: cost 9/12, accuracy 1
        "B": [0.5, 0.5],    # all at exit 0: cost 1/3, accuracy 1/2
        "C": [0.7, 0.5],    # exits 0,1,0,1: cost 1/2, accuracy 3/4
        "E": [0.58, 0.99],  # exits 0,0,0,2: cost 1/2, accuracy 3/4 (ties C, which came first)
        "F": [0.85, 0.5],   # exits 0,1,1,1: cost 7/12, accuracy 1/2 (below the hull)
    }
    fit = fit_e2cm_policy(cache, candidates=list(candidates.values()))
    want = [(1 / 3, 0.5), (0.5, 0.75), (0.75, 1.0), (7 / 12, 0.5)]
    for (c, a), (wc, wa) in zip([fit.candidates[i] for i in (1, 2, 0, 4)], want):
        assert c == pytest.approx(wc) and a == pytest.approx(wa)
    assert fit.candidates[-1] == pytest.approx((1.0, 1.0))  # full depth, always tried
    # B -> C -> A: C lies above the chord from B to A (0.75 > 0.7); the full-depth point is no
    # more accurate than A and comes after it
    assert [p["thresholds"] for p in fit.points] == [candidates[k] for k in "BCA"]
    assert fit.policy.params["costs"] == pytest.approx([1 / 3, 0.5, 0.75])
    assert fit.policy.value == pytest.approx(0.75)
    assert replay(fit.policy.with_param(0.6), cache).exit_index.tolist() == [0, 1, 0, 1]
    assert [p["heldout"]["accuracy"] for p in fit.points] == pytest.approx([0.5, 0.75, 1.0])
    with pytest.raises(ew.ConfigError, match="2 thresholds"):
        fit_e2cm_policy(cache, candidates=[[0.5]])


def test_e2cm_end_to_end_runtime_matches_replay():
    torch.manual_seed(0)
    model = ew.attach_exits(tiny_encoder("bert"), layers="all", head="class_means",
                            num_labels=2, dropout=0.0)
    items = token_items(64, seed=0)
    loader = [PaddingCollator()(items[s:s + 16]) for s in range(0, 64, 16)]
    fit_class_means(model, loader, progress=False)
    cache = collect_exit_logits(model, loader, progress=False)
    # no training at all, yet the nearest class mean beats chance on the data it was fit on
    assert float((cache.logits[:, 0].argmax(-1) == cache.labels).float().mean()) > 0.6
    fit = fit_e2cm_policy(cache, trials=30, seed=1)
    again = fit_e2cm_policy(cache, trials=30, seed=1)
    assert fit.policy.to_dict() == again.policy.to_dict()
    costs = fit.policy.params["costs"]
    accs = [p["accuracy"] for p in fit.points]
    assert costs == sorted(costs) and accs == sorted(accs)
    for cost in costs:
        policy = fit.policy.with_param(cost)
        run = torch.cat([model.early_exit(policy, **{k: v for k, v in b.items()
                                                     if k != "labels"}).exit_index
                         for b in loader])
        assert torch.equal(run, replay(policy, cache).exit_index)


def test_misuse_raises_clear_errors():
    data = [{"pixel_values": X, "labels": Y}]
    with pytest.raises(ew.ConfigError, match="labels must be one of"):
        fit_class_means(identity_model(), data, labels="clusters")
    with pytest.raises(ew.ConfigError, match="final exit"):  # class_means cannot label itself
        fit_class_means(identity_model(), data, labels="predicted")
    with pytest.raises(ew.InputError, match="needs labelled batches"):
        fit_class_means(identity_model(), [{"pixel_values": X}], progress=False)
    with pytest.raises(ew.InputError, match=r"class\(es\) \[1\]"):
        fit_class_means(identity_model(), [{"pixel_values": X[:2], "labels": Y[:2]}],
                        progress=False)
    with pytest.raises(ew.InputError, match="one-shot"):
        fit_class_means(identity_model(), iter(data))
    linear = ew.attach_exits(tiny_encoder("bert"), layers="all", head="linear", num_labels=2)
    with pytest.raises(ew.ConfigError, match="no class_means exit"):
        fit_class_means(linear, data)
    regression = ew.attach_exits(tiny_encoder("bert"), layers="all", head="class_means",
                                 num_labels=1)
    with pytest.raises(ew.ConfigError, match="regression"):
        fit_class_means(regression, data)

"""What each built-in policy decides, on hand-made logit sequences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import exitwise as ew
from exitwise.policies.entropy import prediction_entropy


def two_class(p: float) -> list[float]:
    """Logits whose softmax is (p, 1 - p)."""
    return [math.log(p), math.log(1 - p)]


def one_hot(cls: int, c: int = 3, scale: float = 5.0) -> list[float]:
    return [scale if j == cls else 0.0 for j in range(c)]


def first_exits(policy, per_exit_logits, labels=None) -> list[int]:
    """Drive ``policy`` like the executor does: rows that exit are dropped (state kept in step
    with ``keep``) and the last exit takes everyone left. per_exit_logits: (num_exits, B, C).
    Returns each row's exit index."""
    logits = torch.as_tensor(per_exit_logits, dtype=torch.float32)
    num_exits, b = logits.shape[:2]
    active = torch.arange(b)
    state = policy.init_state(b)
    result = [-1] * b
    for k in range(num_exits):
        if k == num_exits - 1:
            done = torch.ones(len(active), dtype=torch.bool)
        else:
            lab = None if labels is None else torch.as_tensor(labels)[active]
            done, state = policy.decide(k, num_exits, logits[k, active], state, lab)
        for r in active[done].tolist():
            result[r] = k
        stay = (~done).nonzero().squeeze(1)
        active, state = active[stay], policy.keep(state, stay)
        if not len(active):
            break
    return result


def test_confidence_threshold_is_inclusive():
    policy = ew.get_policy("confidence", threshold=0.8)
    logits = torch.tensor([two_class(0.8), two_class(0.79), two_class(0.1), two_class(0.5)])
    done, _ = policy.decide(0, 3, logits, policy.init_state(4))
    # 0.1 for class 0 means 0.9 for class 1: confidence is the top probability, either class
    assert done.tolist() == [True, False, True, False]
    always = ew.get_policy("confidence", threshold=0.0)
    assert always.decide(0, 3, logits, {})[0].all()


def test_entropy_threshold():
    logits = torch.tensor([two_class(0.99), two_class(0.9), two_class(0.5)])
    ent = prediction_entropy(logits)
    expected = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.99, 0.9, 0.5)]
    torch.testing.assert_close(ent, torch.tensor(expected), atol=1e-6, rtol=0)
    policy = ew.get_policy("entropy", threshold=0.33)  # H(0.9) = 0.325, H(0.5) = 0.693
    assert policy.decide(0, 3, logits, {})[0].tolist() == [True, True, False]
    strict = ew.get_policy("entropy", threshold=0.0)
    assert not strict.decide(0, 3, logits, {})[0].any()


def test_pabee_patience_counting():
    # rows' argmax over 5 exits
    preds = [
        [0, 0, 0, 1, 1],  # unchanged at exits 1 and 2 -> count 2 at exit 2
        [0, 1, 1, 1, 1],  # count 1 at exit 2, 2 at exit 3
        [1, 0, 1, 0, 1],  # never stable -> forced at the last exit
        [2, 2, 1, 1, 1],  # count 1 at exit 1, reset at 2, 1 at 3, 2 at 4 (= last anyway)
    ]
    seq = [[one_hot(p[k]) for p in preds] for k in range(5)]
    assert first_exits(ew.get_policy("patience", patience=2), seq) == [2, 3, 4, 4]
    assert first_exits(ew.get_policy("patience", patience=1), seq) == [1, 2, 4, 1]
    assert first_exits(ew.get_policy("patience", patience=4), seq) == [4, 4, 4, 4]


def test_pabee_first_exit_never_counts():
    # At the first exit there is no previous prediction to agree with.
    policy = ew.get_policy("patience", patience=1)
    done, state = policy.decide(0, 4, torch.tensor([one_hot(0)]), policy.init_state(1))
    assert not done.any() and state["count"].tolist() == [0]


def test_pcee_patience_and_confidence():
    confident, unsure = two_class(0.95), two_class(0.6)
    rows = [
        [confident, confident, unsure, unsure],  # 2 confident in a row at exit 1
        [unsure, confident, unsure, confident],  # runs of 1 only -> last exit
        [confident, unsure, confident, confident],  # run of 2 ends at exit 3 (= last)
        [unsure, confident, confident, unsure],  # exit 2
    ]
    seq = [[r[k] for r in rows] for k in range(4)]
    policy = ew.get_policy("patience_confidence", threshold=0.9, patience=2, measure="maxprob")
    assert first_exits(policy, seq) == [1, 3, 3, 2]
    # patience 1 is plain confidence
    plain = ew.get_policy("patience_confidence", threshold=0.9, patience=1, measure="maxprob")
    assert first_exits(plain, seq) == [0, 1, 0, 1]
    # with_param tunes the threshold and keeps the patience
    assert policy.with_param(0.5).params == {"threshold": 0.5, "patience": 2, "measure": "maxprob"}
    assert first_exits(policy.with_param(0.5), seq) == [1, 1, 1, 1]


def _normalized_entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs) / math.log(len(probs))


def test_pcee_entropy_rule_by_hand():
    """PCEE-BERT's default: confident <=> entropy / log C < threshold (strict), counted from
    the first exit, reset by any unconfident exit, exit when the count reaches patience."""
    probs = [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.98, 0.01, 0.01], [0.34, 0.33, 0.33]]
    ents = [_normalized_entropy(p) for p in probs]  # 0.3590, 0.8173, 0.1019, 0.9999
    logits = torch.log(torch.tensor(probs))
    from exitwise.policies.patience_confidence import normalized_entropy

    torch.testing.assert_close(normalized_entropy(logits), torch.tensor(ents), atol=1e-6, rtol=0)
    policy = ew.get_policy("patience_confidence", threshold=0.4, patience=2)
    assert policy.params["measure"] == "entropy"
    done, state = policy.decide(0, 5, logits, policy.init_state(4))
    assert state["count"].tolist() == [1, 0, 1, 0] and not done.any()
    done, state = policy.decide(1, 5, logits, state)
    assert state["count"].tolist() == [2, 0, 2, 0] and done.tolist() == [True, False, True, False]
    # the boundary is strict: an entropy equal to the threshold is not confident
    exact = float(normalized_entropy(logits[:1])[0])
    at = ew.get_policy("patience_confidence", threshold=exact, patience=1)
    assert at.decide(0, 5, logits[:1], at.init_state(1))[0].tolist() == [False]
    # over exits: row entropies (normalized) per exit -> first exit with 2 confident in a row
    p_conf, p_unsure = [0.97, 0.03], [0.7, 0.3]  # 0.194 and 0.881 of log 2
    rows = [
        [p_conf, p_conf, p_unsure, p_unsure],
        [p_unsure, p_conf, p_unsure, p_conf],
        [p_unsure, p_conf, p_conf, p_unsure],
    ]
    seq = [[[math.log(v) for v in r[k]] for r in rows] for k in range(4)]
    pcee = ew.get_policy("patience_confidence", threshold=0.5, patience=2)
    assert first_exits(pcee, seq) == [1, 3, 2]
    # a looser threshold counts the unsure exits too (0.881 < 0.9)
    assert first_exits(pcee.with_param(0.9), seq) == [1, 1, 1]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_static_exit(k):
    seq = torch.randn(4, 3, 2).tolist()
    assert first_exits(ew.get_policy("static", exit=k), seq) == [k, k, k]


def test_static_beyond_last_exit_means_last():
    assert first_exits(ew.get_policy("static", exit=9), torch.randn(3, 2, 2).tolist()) == [2, 2]


def test_oracle_picks_first_correct_exit():
    preds = [[1, 0, 2, 0], [1, 1, 2, 1], [0, 2, 2, 1]]  # rows' argmax at exits 0..2
    labels = [0, 1, 2, 2]
    seq = [[one_hot(p) for p in exit_preds] for exit_preds in preds]
    # row0: correct at exit 2; row1: exit 1; row2: exit 0; row3: never correct -> last
    assert first_exits(ew.get_policy("oracle"), seq, labels) == [2, 1, 0, 2]


def test_never_never_exits():
    policy = ew.get_policy("never")
    sure = torch.tensor([one_hot(0, scale=50.0)] * 3)
    assert not policy.decide(0, 4, sure, {})[0].any()
    assert first_exits(policy, [sure.tolist()] * 4) == [3, 3, 3]


def test_oracle_in_the_real_runtime():
    torch.manual_seed(3)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)]
    model = ew.attach_exits(
        ew.SequentialBackbone(blocks, example=torch.randn(1, 6)), head="linear", num_labels=3
    ).eval()
    with torch.no_grad():
        for h in model.heads:
            h.classifier.weight.mul_(5)
    x = torch.randn(16, 6)
    labels = torch.randint(0, 3, (16,))
    with torch.no_grad():
        preds = model(pixel_values=x).stacked().argmax(-1)  # (B, exits)
    res = model.early_exit(ew.get_policy("oracle"), labels=labels, pixel_values=x)
    for r in range(16):
        hits = (preds[r] == labels[r]).nonzero()
        expected = int(hits[0]) if len(hits) else model.num_exits - 1
        assert int(res.exit_index[r]) == expected
    assert len(set(res.exit_index.tolist())) >= 2


def test_entropy_threshold_is_inclusive():
    # a row whose entropy equals the threshold exits (entropy <= threshold)
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    h = float(prediction_entropy(logits[1:])[0])
    done, _ = ew.get_policy("entropy", threshold=h).decide(0, 3, logits, {})
    assert done.tolist() == [False, True]
    one_hot, _ = ew.get_policy("entropy", threshold=0.0).decide(
        0, 3, torch.tensor([[200.0, 0.0]]), {})
    assert one_hot.tolist() == [True]


def test_regression_tolerance_follows_the_targets_spread():
    from exitwise.policies.patience import TOLERANCE_PER_SD, tolerance_for_targets

    targets = [0.0, 1.0, 2.0, 3.0]  # population sd sqrt(1.25)
    assert tolerance_for_targets(targets) == pytest.approx(TOLERANCE_PER_SD * 1.25 ** 0.5)
    # the same targets in other units: the same tolerance in those units
    assert tolerance_for_targets([100 * t for t in targets]) == pytest.approx(
        100 * tolerance_for_targets(targets))
    assert tolerance_for_targets([2.0, 2.0]) == 0.1 and tolerance_for_targets([1.0]) == 0.1
    assert tolerance_for_targets([0.0, float("nan"), 2.0]) == pytest.approx(TOLERANCE_PER_SD)

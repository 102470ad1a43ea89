"""CATs: the conformal quantile, the nonconformity, the meta consistency loss, the guarantee
on simulated data, and the whole recipe through training, calibration, executor and replay."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, collect_exit_logits, replay
from exitwise.calibration.conformal import (
    calibrate_cats,
    conformal_threshold,
    consistent_exits,
    nonconformity,
    rows_needed,
)
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, train
from exitwise.training.cats import meta_consistency_loss


def test_conformal_threshold_by_hand():
    values = torch.tensor([0.2, 0.5, 0.9, 0.7])
    # numpy.quantile([0.2, 0.5, 0.7, 0.9, inf], 0.75, "higher"): position 3 -> 0.9
    assert conformal_threshold(values, 0.25) == pytest.approx(0.9)
    # position ceil(0.5 * 4) = 2 -> 0.7
    assert conformal_threshold(values, 0.5) == pytest.approx(0.7)
    # epsilon below 1 / (n + 1): the appended +inf
    assert conformal_threshold(values, 0.1) == math.inf
    # training-conditional: P[Bin(4, .75) <= k-1] = .0039, .0508, .2617, .6836 for k = 1..4
    assert conformal_threshold(values, 0.25, delta=0.5) == pytest.approx(0.9)  # k = 4
    assert conformal_threshold(values, 0.25, delta=0.1) == math.inf  # no k reaches .9
    assert conformal_threshold(values, 0.5, delta=0.5) == pytest.approx(0.7)  # P[Bin(4,.5)<=2]=.6875
    with pytest.raises(ew.ConfigError):
        conformal_threshold(values, 1.5)
    with pytest.raises(ew.ConfigError):
        conformal_threshold(values, 0.1, delta=0.0)


def test_too_few_inconsistent_rows_are_refused_with_the_count_needed():
    # on average: the "higher" index ceil((1 - eps) M) must stay below the appended +inf,
    # i.e. M >= 1 / eps; with delta: 1 - (1 - eps)^M >= 1 - delta (k = M), M >= 229.1
    assert rows_needed(0.1, None) == 10 and rows_needed(0.25, None) == 4
    assert rows_needed(0.01, 0.1) == 230 and rows_needed(0.1, 0.1) == 22
    for eps, delta in ((0.1, None), (0.01, 0.1), (0.1, 0.1)):
        need = rows_needed(eps, delta)
        values = torch.linspace(0.1, 0.9, need)
        assert conformal_threshold(values, eps, delta) < math.inf
        assert conformal_threshold(values[1:], eps, delta) == math.inf
    # a cache with 9 rows whose exit 0 disagrees: eps=0.1 needs 10; the policy that never
    # exits came back as meeting its target before
    n = 12
    logits = torch.zeros(n, 2, 2)
    logits[:, 1, 1] = 1.0  # the final exit says 1
    logits[:9, 0, 0] = 1.0  # exit 0 says 0 on the first 9 rows
    logits[9:, 0, 1] = 1.0
    cost = torch.tensor([1.0, 2.0], dtype=torch.float64).expand(n, 2)
    cache = ExitLogitsCache(logits, torch.ones(n, dtype=torch.long), cost,
                            torch.full((n,), 2.0, dtype=torch.float64), [1, 2],
                            meta={"scorer": "cats"},
                            scores=torch.linspace(0.05, 0.6, n)[:, None].expand(n, 2).clone())
    with pytest.raises(ew.calibration.CalibrationRefused,
                       match="at least 10 held-out rows .* have 9"):
        calibrate_cats(cache, epsilon=0.1, delta=None)
    # eps=0.2: the "higher" quantile of the 9 values + inf at index ceil(.8 * 9) = 8: the 9th
    # smallest, row 8's score 0.05 + 8 * 0.05
    assert calibrate_cats(cache, epsilon=0.2, delta=None).policy.value == pytest.approx(0.45)


def test_nonconformity_is_the_largest_score_of_an_inconsistent_early_exit():
    logits = torch.tensor([
        [[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]],   # exit 0 disagrees with the final exit
        [[0.0, 2.0], [0.0, 1.0], [0.0, 3.0]],   # all agree
        [[3.0, 0.0], [2.0, 0.0], [0.0, 1.0]],   # exits 0 and 1 disagree
    ])
    assert consistent_exits(logits).tolist() == [[False, True, True], [True, True, True],
                                                  [False, False, True]]
    scores = torch.tensor([[0.9, 0.4, 0.1], [0.3, 0.8, 0.5], [0.2, 0.6, 0.99]])
    # row 0: 0.9; row 1 left out; row 2: max(0.2, 0.6) (the final column never counts)
    assert nonconformity(scores, consistent_exits(logits)).tolist() == pytest.approx([0.9, 0.6])


def test_meta_consistency_loss_by_hand():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])]
    scores = [torch.tensor([0.3, 0.8]), torch.tensor([0.5, 0.5])]
    # exit 0 vs final: row 0 disagrees (target 0), row 1 agrees (target 1); final not counted
    expected = -(math.log(1 - 0.3) + math.log(0.8)) / 2
    got = meta_consistency_loss(ExitOutputs(logits=logits, scores=scores))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def _simulated(n: int, seed: int):
    """Scores and consistency of 4 exits; deeper exits agree more, the score knows it."""
    g = torch.Generator().manual_seed(seed)
    p_agree = torch.tensor([0.6, 0.75, 0.9, 1.0])
    consistent = torch.rand(n, 4, generator=g) < p_agree
    consistent[:, -1] = True
    noise = torch.randn(n, 4, generator=g)
    scores = torch.sigmoid(2.5 * consistent.float() - 1.0 + noise)
    return scores, consistent


def _consistency(scores, consistent, tau):
    above = scores[:, :-1] > tau
    first = torch.where(above.any(1), above.float().argmax(1), torch.full_like(above[:, 0], 3,
                                                                                 dtype=torch.long))
    return float(consistent[torch.arange(len(first)), first].double().mean())


def test_the_guarantee_holds_on_simulated_exchangeable_rows():
    eps = 0.05
    marginal, pac = [], []
    for trial in range(40):
        cal_s, cal_y = _simulated(500, seed=trial)
        test_s, test_y = _simulated(4000, seed=10_000 + trial)
        tau = conformal_threshold(nonconformity(cal_s, cal_y), eps)
        marginal.append(_consistency(test_s, test_y, tau))
        tau_pac = conformal_threshold(nonconformity(cal_s, cal_y), eps, delta=0.1)
        pac.append(_consistency(test_s, test_y, tau_pac))
    # on average over calibration draws (with some Monte-Carlo slack) ...
    assert sum(marginal) / len(marginal) >= 1 - eps - 0.005
    # ... and, training-conditionally, in at least 1 - delta of the draws (slack for 40 draws)
    assert sum(c >= 1 - eps for c in pac) / len(pac) >= 0.8
    # and it is not vacuous: rows do leave early
    assert all(c < 1.0 for c in marginal)


def test_cats_recipe_end_to_end(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model()
    result = train(model, items, strategy="cats", output_dir=tmp_path, max_steps=30,
                   strategy_options={"stage_args": [{}, {"learning_rate": 2e-2}]},
                   save_final=False, **FAST)
    assert [s.name for s in result.stages] == ["stage-1", "stage-2"]
    model.eval()
    loader = [PaddingCollator()(items[s : s + 16]) for s in range(0, 96, 16)]
    cache = collect_exit_logits(model, loader, progress=False)
    calibrated = calibrate_cats(cache, epsilon=0.2, delta=None)
    policy = calibrated.policy
    assert calibrated.heldout["consistency"] >= 0.8 - 1 / 96
    offline = replay(policy, cache, model.temperatures)
    live = torch.cat([model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
                      .exit_index for b in loader])
    assert torch.equal(live, offline.exit_index)
    # saved with the model and loaded back
    ew.calibration.store_calibration(model, "cats@eps0.2", calibrated)
    model.save_pretrained(tmp_path / "saved", save_backbone=True)
    again = ew.MultiExitModel.from_pretrained(tmp_path / "saved")
    assert again.calibrated_policy("cats@eps0.2").to_dict() == policy.to_dict()
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(num_labels=1), [dict(i, labels=0.5) for i in items[:8]],
              strategy="cats", output_dir=tmp_path / "reg", max_steps=1, **FAST)
    plain = collect_exit_logits(tiny_model(), loader[:1], progress=False)
    with pytest.raises(ew.InputError, match="scorer"):
        calibrate_cats(plain, epsilon=0.1)

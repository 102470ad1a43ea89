"""Threshold search to a target on synthetic caches with known answers, and storing results."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import padded_batch, tiny_encoder

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, collect_exit_logits, replay
from exitwise.calibration import (
    CalibrationResult,
    apply_temperatures,
    drop_stale_calibrations,
    fit_temperatures,
    search_accuracy_drop,
    search_budget,
    store_calibration,
)
from exitwise.errors import ConfigError, InputError
from exitwise.policies.entropy import prediction_entropy


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def known_cache(n: int = 200) -> ExitLogitsCache:
    """2 classes, 3 exits costing 1, 2, 3 (full model: 3).

    Easy half: exit 0 right with margin 4 (confidence 0.982). Hard half: exit 0 right on 50%
    with margin 0.2 (0.550), exit 1 right on 60% with margin 0.3 (0.574). The final exit is
    always right (margin 1). So, for the confidence policy:
      t <= 0.549          everyone leaves at exit 0:   accuracy 0.75, compute 1/3
      0.550 < t <= 0.574  easy @0, hard @1:           accuracy 0.80, compute 1/2
      0.575 <= t <= 0.982 easy @0, hard @final:       accuracy 1.00, compute 2/3
      t > 0.982           everyone runs to the end:   accuracy 1.00, compute 1
    """
    labels = torch.arange(n) % 2
    half = n // 2
    hard = torch.arange(n) >= half
    logits = torch.zeros(n, 3, 2)

    def put(rows: torch.Tensor, exit_k: int, right: torch.Tensor, margin: float) -> None:
        pred = torch.where(right, labels[rows], 1 - labels[rows])
        logits[rows, exit_k, pred] = margin

    easy_rows, hard_rows = (~hard).nonzero().squeeze(1), hard.nonzero().squeeze(1)
    put(easy_rows, 0, torch.ones(half, dtype=torch.bool), 4.0)
    put(hard_rows, 0, torch.arange(half) % 2 == 0, 0.2)  # 50% right
    put(easy_rows, 1, torch.ones(half, dtype=torch.bool), 3.0)
    put(hard_rows, 1, torch.arange(half) % 10 < 6, 0.3)  # 60% right
    put(torch.arange(n), 2, torch.ones(n, dtype=torch.bool), 1.0)
    costs = torch.tensor([[1.0, 2.0, 3.0]]).expand(n, 3)
    return ExitLogitsCache(logits, labels, costs, torch.full((n,), 3.0), [1, 2, 3])


CACHE = known_cache()
PLATEAU = (sigmoid(0.3), sigmoid(4.0))  # thresholds giving accuracy 1.0 at compute 2/3


def test_accuracy_drop_picks_the_fast_lossless_plateau() -> None:
    res = search_accuracy_drop("confidence", CACHE, max_drop_points=1.0)
    assert isinstance(res, CalibrationResult) and res.met_target
    assert PLATEAU[0] < res.param <= PLATEAU[1]
    assert res.heldout["accuracy"] == pytest.approx(1.0)
    assert res.heldout["full_accuracy"] == pytest.approx(1.0)
    assert res.heldout["relative_compute"] == pytest.approx(2 / 3)
    assert res.heldout["flops_speedup"] == pytest.approx(1.5)
    assert res.heldout["exit_histogram"] == [100, 0, 100]
    assert res.target == {"kind": "accuracy_drop", "max_drop": 0.01, "max_drop_points": 1.0}
    # The middle of the plateau, not its edge.
    plateau = [v for v in ew.get_policy("confidence").grid(3) if PLATEAU[0] < v <= PLATEAU[1]]
    assert res.param == plateau[len(plateau) // 2]
    # Same answer with the drop as a fraction; entropy finds the same operating point.
    assert search_accuracy_drop("confidence", CACHE, max_drop=0.01).param == res.param
    ent = search_accuracy_drop(ew.get_policy("entropy"), CACHE, max_drop=0.01)
    assert ent.heldout["relative_compute"] == pytest.approx(2 / 3)
    assert ent.heldout["accuracy"] == pytest.approx(1.0)


def test_accuracy_drop_trades_accuracy_when_allowed() -> None:
    res = search_accuracy_drop("confidence", CACHE, max_drop_points=30.0)
    assert res.param < sigmoid(0.2)
    assert res.heldout["accuracy"] == pytest.approx(0.75)
    assert res.heldout["relative_compute"] == pytest.approx(1 / 3)
    mid = search_accuracy_drop("confidence", CACHE, max_drop_points=22.0)
    assert mid.heldout["accuracy"] == pytest.approx(0.80)
    assert mid.heldout["relative_compute"] == pytest.approx(1 / 2)


def test_budget_search_respects_the_budget() -> None:
    for budget, accuracy, compute in [(0.7, 1.0, 2 / 3), (0.55, 0.8, 0.5), (0.4, 0.75, 1 / 3)]:
        res = search_budget("confidence", CACHE, None, budget)
        assert res.met_target
        assert res.heldout["relative_compute"] <= budget
        assert res.heldout["accuracy"] == pytest.approx(accuracy)
        assert res.heldout["relative_compute"] == pytest.approx(compute)
        assert res.target == {"kind": "budget", "budget": budget}
    with pytest.warns(UserWarning, match="budget"):
        cheap = search_budget("confidence", CACHE, budget=0.2)
    assert not cheap.met_target and cheap.heldout["relative_compute"] == pytest.approx(1 / 3)


# Policies that read a learned exit score get one: each exit's top probability (a stand-in
# for a trained scorer that knows when the exit is right).
SCORED = ExitLogitsCache(CACHE.logits, CACHE.labels, CACHE.costs, CACHE.full_cost,
                         CACHE.exit_layers, scores=CACHE.logits.softmax(-1).amax(-1))


@pytest.mark.parametrize("name", [n for n in ew.POLICIES.names() if n != "oracle"])
def test_every_deployable_policy_meets_its_targets(name: str) -> None:
    cache = SCORED if ew.POLICIES.get(name).uses_scores else CACHE
    if not ew.POLICIES.get(name).reaches_full_depth:
        # ELBERT: its window stage exits rows whatever the threshold, so the target may be
        # out of reach; the search says so and returns its most accurate setting
        with pytest.warns(UserWarning, match="no setting keeps accuracy"):
            drop = search_accuracy_drop(name, cache, max_drop_points=5.0)
        assert not drop.met_target
        assert drop.heldout["accuracy"] == max(p["accuracy"] for p in drop.curve)
        assert drop.heldout["mean_layers"] < cache.exit_layers[-1]  # the window exited rows
        return
    drop = search_accuracy_drop(name, cache, max_drop_points=5.0)
    assert drop.met_target and drop.heldout["accuracy"] >= 0.95 - 1e-12
    # The chosen setting is the fastest qualifying point of its own sweep.
    ok = [p for p in drop.curve if p["accuracy"] >= 0.95 - 1e-12]
    assert drop.heldout["flops_speedup"] == pytest.approx(max(p["flops_speedup"] for p in ok))
    # Replaying the stored policy reproduces the reported held-out numbers.
    again = replay(drop.policy, cache)
    assert again.accuracy == pytest.approx(drop.heldout["accuracy"])
    budget = search_budget(name, cache, budget=1.0)
    assert budget.met_target and budget.heldout["relative_compute"] <= 1.0 + 1e-12


def test_targets_out_of_range_raise_config_error() -> None:
    for kwargs in [
        {"max_drop_points": -1.0},
        {"max_drop_points": 101.0},
        {"max_drop": 1.5},
        {"max_drop": float("nan")},
        {"max_drop_points": "1"},
        {"max_drop": 0.01, "max_drop_points": 1.0},
        {},
    ]:
        with pytest.raises(ConfigError):
            search_accuracy_drop("confidence", CACHE, **kwargs)
    for budget in (0.0, -0.5, 1.01, float("nan"), None, "0.5"):
        with pytest.raises(ConfigError):
            search_budget("confidence", CACHE, budget=budget)
    with pytest.raises(ConfigError, match="labels"):
        search_budget("oracle", CACHE, budget=0.5)
    with pytest.raises(ConfigError):
        search_budget("no-such-policy", CACHE, budget=0.5)


def test_bad_caches_raise_input_error() -> None:
    empty = CACHE.subset(torch.tensor([], dtype=torch.long))
    with pytest.raises(InputError, match="empty"):
        search_accuracy_drop("confidence", empty, max_drop=0.01)
    with pytest.raises(InputError, match="empty"):
        search_budget("entropy", empty, budget=0.5)
    nan = CACHE.subset(torch.arange(len(CACHE)))
    nan.logits[7, 2, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        search_accuracy_drop("confidence", nan, max_drop=0.01)
    with pytest.raises(InputError, match="NaN"):
        search_budget("patience", nan, budget=0.5)
    unlabeled = CACHE.subset(torch.arange(len(CACHE)))
    unlabeled.labels[0] = -1
    with pytest.raises(InputError, match="label"):
        search_budget("confidence", unlabeled, budget=0.5)


def test_temperatures_are_used_by_the_search() -> None:
    # Cooling exit 0 (T = 0.25) makes the hard rows confident there (margin 0.8 -> 0.69),
    # so the lossless plateau moves up and the search must use the scaled confidences.
    temps = torch.tensor([0.25, 1.0, 1.0])
    res = search_accuracy_drop("confidence", CACHE, temps, max_drop=0.0)
    assert res.heldout["accuracy"] == pytest.approx(1.0)
    assert res.param > sigmoid(0.2 / 0.25)
    assert res.temperatures == pytest.approx([0.25, 1.0, 1.0])


def test_store_calibration_and_run_it_for_real(tmp_path) -> None:
    """Collect a held-out cache from a tiny model, calibrate, store, save/load, run."""
    model = ew.attach_exits(
        tiny_encoder("bert"), ew.ExitConfig(layers=[1, 2], head="pooler", num_labels=2, dropout=0.0)
    ).eval()
    lengths = (7, 4, 9, 5, 3, 8, 6, 2, 9, 1, 5, 6)
    batches = [
        dict(padded_batch(lengths, seed=s), labels=torch.tensor([0, 1] * 6)) for s in (1, 2)
    ]
    cache = collect_exit_logits(model, batches, progress=False)
    apply_temperatures(model, fit_temperatures(cache))
    # PABEE (stateful) exits at mixed depths on this model; the budget is the target.
    res = search_budget("patience", cache, model.temperatures, budget=0.9)

    # A search run with other temperatures than the model's must not be stored.
    other = search_budget("entropy", cache, torch.full((3,), 2.0), budget=0.9)
    with pytest.raises(ConfigError, match="temperatures"):
        store_calibration(model, "x", other)
    assert "policies" not in model.calibration
    store_calibration(model, "patience@0.9", res)
    entry = model.calibration["policies"]["patience@0.9"]
    assert entry["policy"] == res.policy.to_dict()
    assert entry["target"] == {"kind": "budget", "budget": 0.9}
    assert entry["heldout"]["relative_compute"] <= 0.9
    assert model.calibration["default"] == "patience@0.9"
    second = search_accuracy_drop("entropy", cache, model.temperatures, max_drop_points=1.0)
    store_calibration(model, "entropy@1pt", second)
    assert model.calibration["default"] == "patience@0.9"  # the first one stays the default
    assert model.calibrated_policy("entropy@1pt").value == second.param

    model.save_pretrained(tmp_path / "m")
    loaded = ew.MultiExitModel.from_pretrained(tmp_path / "m", backbone=tiny_encoder("bert"))
    assert loaded.calibration == model.calibration
    assert torch.equal(loaded.temperatures, model.temperatures)
    # The stored default runs for real and agrees with the replay it was chosen on.
    live = [loaded.early_exit(**{k: v for k, v in b.items() if k != "labels"}) for b in batches]
    offline = replay(loaded.calibrated_policy(), cache, loaded.temperatures)
    assert torch.equal(torch.cat([r.exit_index for r in live]), offline.exit_index)
    assert torch.equal(torch.cat([r.flops for r in live]), offline.costs)

    # A model cast to bfloat16 holds its temperatures rounded: still the ones searched under
    half = copy.deepcopy(loaded).to(torch.bfloat16)
    assert half.temperatures.dtype == torch.bfloat16
    assert half.temperature_list() != loaded.temperature_list()
    assert half.calibrated_policy().to_dict() == loaded.calibrated_policy().to_dict()
    # Other temperatures later (another calibration run): the entries searched under the old
    # ones would run under thresholds and a certificate that no longer hold (they ran, with
    # their old certified bound, before), so they are refused by name and can be dropped.
    previous = loaded.temperature_list()
    apply_temperatures(loaded, torch.ones(3))
    with pytest.raises(ew.InputError, match="'patience@0.9' was calibrated with temperatures"):
        loaded.calibrated_policy()
    third = search_accuracy_drop("confidence", cache, loaded.temperatures, max_drop_points=1.0)
    store_calibration(loaded, "confidence@1pt", third)
    assert drop_stale_calibrations(loaded, previous) == ["patience@0.9", "entropy@1pt"]
    assert list(loaded.calibration["policies"]) == ["confidence@1pt"]
    assert loaded.calibration["default"] == "confidence@1pt"
    # an entry saved before temperatures were recorded counts as made under the previous ones
    del loaded.calibration["policies"]["confidence@1pt"]["temperatures"]
    assert drop_stale_calibrations(loaded, [1.0, 1.0, 1.0]) == []
    assert drop_stale_calibrations(loaded, previous) == ["confidence@1pt"]
    assert loaded.calibration["default"] is None


@pytest.mark.parametrize("name", ["confidence", "entropy"])
def test_many_classes_the_grid_reaches_confident_low_probability_exits(name) -> None:
    # 100 classes, every exit right with a top probability near 0.35 (entropy near 2.5
    # nats): the grids once stopped at 0.5 / 1 nat and so never let a row leave early
    g = torch.Generator().manual_seed(0)
    n, c = 300, 100
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, 3, c, generator=g) * 0.5
    logits[torch.arange(n), :, labels] += 4.0
    top = torch.softmax(logits[:, 0], -1).amax(-1)
    assert float(top.median()) < 0.5
    assert float(prediction_entropy(logits[:, 0]).median()) > 1.0
    cost = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).expand(n, 3)
    cache = ExitLogitsCache(logits, labels, cost, torch.full((n,), 3.0, dtype=torch.float64),
                            [1, 2, 3])
    result = search_accuracy_drop(name, cache, max_drop_points=1.0)
    assert result.heldout["flops_speedup"] == pytest.approx(3.0)  # all leave at the first exit
    assert search_budget(name, cache, budget=0.5).met_target


def _plain_cache(logits: torch.Tensor, labels: torch.Tensor) -> ExitLogitsCache:
    n, e = logits.shape[:2]
    costs = torch.arange(1, e + 1, dtype=torch.float64).expand(n, e)
    return ExitLogitsCache(logits, labels, costs, torch.full((n,), float(e),
                                                             dtype=torch.float64),
                           list(range(1, e + 1)))


def test_an_undefined_score_never_wins_a_budget() -> None:
    # regression: exit 1 predicts a constant, so its Pearson r is undefined (NaN); the
    # budget once picked it over exit 2, which fits too with r near 1
    y = torch.linspace(0, 5, 50)
    pred = torch.stack([torch.full((50,), 2.5), y + 0.3 * torch.sin(7 * y), y], 1)
    cache = _plain_cache(pred.unsqueeze(-1), y)
    result = search_budget("static", cache, budget=0.7)
    assert result.param == 1 and result.heldout["score"] > 0.9


def test_disagreement_without_delta_is_the_observed_disagreement() -> None:
    # with delta=None the risk is observed, not certified; it once fell back to the accuracy
    # drop whatever risk said (and took any name)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (1000,), generator=g)
    logits = torch.randn(1000, 3, 3, generator=g)
    for k, s in enumerate([1.0, 2.0, 3.0]):
        logits[torch.arange(1000), k, y] += s
    cache = _plain_cache(logits, y)
    result = search_accuracy_drop("confidence", cache, max_drop=0.02, risk="disagreement")
    final = cache.logits[:, -1].argmax(-1)
    got = replay(result.policy, cache).predictions
    assert float((got != final).double().mean()) <= 0.02
    assert result.target["risk"] == "disagreement"
    with pytest.raises(ConfigError, match="risk"):
        search_accuracy_drop("confidence", cache, max_drop=0.02, risk="no-such-risk")


def test_bonferroni_refuses_a_slice_too_small_at_its_own_level() -> None:
    # a policy with no safer direction tests each setting at delta / m: 200 rows can never
    # certify 2 points there, so it is refused up front, not after every setting failed
    from exitwise.calibration import CalibrationRefused

    y = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(200, 3, 2)
    logits[torch.arange(200), :, y] = 3.0
    policy = ew.get_policy("window", threshold=0.5, width=0.1, tune="threshold")
    assert policy.safer_when is None
    with pytest.raises(CalibrationRefused, match="bonferroni"):
        search_accuracy_drop(policy, _plain_cache(logits, y), max_drop=0.02, delta=0.1)


def test_regression_caches_are_refused_by_right_wrong_measures_and_labels_are_checked():
    from exitwise.analysis import per_exit_accuracy

    y = torch.linspace(0, 1, 10)
    with pytest.raises(InputError, match="Pearson"):
        per_exit_accuracy(_plain_cache(torch.randn(10, 2, 1), y))
    labels = torch.tensor([0, 1, 5, 1])
    with pytest.raises(InputError, match=r"class ids in \[0, 3\)"):
        replay(ew.get_policy("never"), _plain_cache(torch.randn(4, 2, 3), labels))


def test_fits_on_a_gated_cache_never_count_a_row_at_an_exit_it_skipped():
    # half the rows skipped the first exit's block (a skip gate): replay never offers them
    # that exit, so E2CM's fitted points and MSDNet's thresholds must not count them there
    from exitwise.calibration.budget import fit_budget_policy
    from exitwise.calibration.e2cm import fit_e2cm_policy

    g = torch.Generator().manual_seed(0)
    n = 400
    y = torch.randint(0, 3, (n,), generator=g)
    logits = torch.randn(n, 3, 3, generator=g)
    for k, s in enumerate([2.0, 2.5, 4.0]):
        logits[torch.arange(n), k, y] += s
    skipped = torch.zeros(n, 3, dtype=torch.bool)
    skipped[: n // 2, 0] = True
    costs = torch.tensor([[1.0, 2.0, 3.0]] * n, dtype=torch.float64)
    cache = ExitLogitsCache(logits, y, costs, torch.full((n,), 3.0, dtype=torch.float64),
                            [1, 2, 3], skipped=skipped)
    for point in fit_e2cm_policy(cache, candidates=[[0.5, 0.5]]).points:
        assert point["cost"] == pytest.approx(point["heldout"]["relative_compute"])
        assert point["accuracy"] == pytest.approx(point["heldout"]["accuracy"])
    point = fit_budget_policy(cache, [0.7]).points[0]
    fractions = point["heldout"]["exit_fractions"]
    assert fractions[0] <= 0.5 + 1e-9  # only the rows offered exit 1 can leave there
    assert fractions[0] == pytest.approx(point["target_fractions"][0], abs=0.01) or (
        fractions[0] == pytest.approx(0.5))

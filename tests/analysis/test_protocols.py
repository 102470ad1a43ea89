"""Evaluation protocols on synthetic exit-logits caches: numbers checked against hand
computation, JSON-ability, and every plot written as a PNG."""

from __future__ import annotations

import json

import pytest
import torch

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, replay
from exitwise.protocols import (
    anytime,
    auroc,
    budgeted_batch,
    fixed_cost_table,
    ood_auroc,
    overthinking_report,
    plot_anytime,
    plot_budgeted_batch,
    plot_fixed_cost,
    plot_ood_roc,
    plot_overthinking,
    plot_risk_coverage,
    risk_coverage,
    selective_classification,
    window_outcome,
)
from exitwise.errors import ConfigError, InputError

REL_COSTS = [0.3, 0.55, 0.8, 1.02]


def make_cache(n: int = 400, seed: int = 0, strength: float = 0.9, ood: bool = False):
    """4 exits, 5 classes; deeper exits are right more often. OOD rows get flat logits."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, 4, 5, generator=g)
    if not ood:
        for k in range(4):
            logits[torch.arange(n), k, labels] += strength * (k + 1)
    else:
        logits = logits * 0.3
        labels = torch.full((n,), -1)
    costs = torch.tensor(REL_COSTS, dtype=torch.float64).repeat(n, 1) * 100.0
    return ExitLogitsCache(logits, labels, costs, torch.full((n,), 100.0, dtype=torch.float64),
                           [2, 4, 6, 8])


@pytest.fixture(scope="module")
def caches():
    return make_cache(seed=1), make_cache(seed=2)


def test_anytime(caches):
    _, test = caches
    res = anytime(test)
    pts = res["points"]
    assert [p["exit"] for p in pts] == [0, 1, 2, 3] and [p["layer"] for p in pts] == [2, 4, 6, 8]
    assert [p["relative_compute"] for p in pts] == pytest.approx(REL_COSTS)
    preds = test.logits.argmax(-1)
    for k, p in enumerate(pts):
        assert p["accuracy"] == pytest.approx(float((preds[:, k] == test.labels).double().mean()))
    assert res["full_accuracy"] == pts[-1]["accuracy"]
    json.dumps(res)


def test_budgeted_batch_fits_on_heldout_and_reports_test(caches):
    heldout, test = caches
    res = budgeted_batch(heldout, test, budgets=[0.35, 0.5, 0.7, 0.95])
    assert res["fit_on"] == "heldout" and len(res["points"]) == 4
    policy = ew.policies.policy_from_dict(res["policy"])
    for p in res["points"]:
        # Held-out spending meets the budget; test numbers are a replay on the test cache.
        assert p["heldout_relative_compute"] == pytest.approx(p["budget"], abs=0.01)
        again = replay(policy.with_param(p["budget"]), test)
        assert p["accuracy"] == again.accuracy
        assert p["relative_compute"] == pytest.approx(again.relative_compute)
        assert sum(p["exit_fractions"]) == pytest.approx(1.0)
    accs = [p["accuracy"] for p in res["points"]]
    assert accs[0] < accs[-1]
    json.dumps(res)
    with pytest.warns(UserWarning, match="same cache"):
        budgeted_batch(test, test, budgets=[0.5])


def test_budgeted_batch_default_budgets_span_the_exits(caches):
    heldout, test = caches
    res = budgeted_batch(heldout, test)
    budgets = [p["budget"] for p in res["points"]]
    assert len(budgets) == 20
    assert budgets[0] == pytest.approx(REL_COSTS[0]) and budgets[-1] == pytest.approx(REL_COSTS[-1])


def test_fixed_cost_table_is_best_under_budget(caches):
    heldout, test = caches
    res = fixed_cost_table(heldout, test)
    assert "not interpolated" in res["method"]
    rows = {r["fraction"]: r for r in res["rows"]}
    assert set(rows) == {0.25, 0.5, 0.75, 1.0}
    # 25%: even the first exit (30%) is too expensive.
    assert rows[0.25]["static"] is None and rows[0.25]["budgeted"] is None
    # 50% -> exit 0 (30%); 75% -> exit 1 (55%); 100% -> exit 2 (the last costs 102%).
    assert [rows[f]["static"]["exit"] for f in (0.5, 0.75, 1.0)] == [0, 1, 2]
    acc = anytime(test)["points"]
    assert rows[0.75]["static"]["accuracy"] == acc[1]["accuracy"]
    for f in (0.5, 0.75, 1.0):
        b = rows[f]["budgeted"]
        assert b["within_budget"] == (b["relative_compute"] <= f + 1e-12)
        assert b["relative_compute"] == pytest.approx(f, abs=0.05)
    json.dumps(res)
    with pytest.raises(ConfigError):
        fixed_cost_table(heldout, test, fractions=[0.0])


def test_overthinking_report_reuses_metrics(caches):
    _, test = caches
    res = overthinking_report(test)
    assert res["protocol"] == "overthinking"
    assert res["wasteful"] == ew.analysis.overthinking(test)["wasteful"]
    assert len(res["per_exit_accuracy"]) == 4
    json.dumps(res)


def test_risk_coverage_by_hand():
    conf = torch.tensor([0.9, 0.8, 0.8, 0.6, 0.5])
    correct = torch.tensor([True, False, True, True, False])
    curve = risk_coverage(conf, correct)
    # Ties (0.8) are accepted together.
    assert curve["coverage"] == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert curve["risk"] == pytest.approx([0.0, 1 / 3, 1 / 4, 2 / 5])
    # AURC: mean over the 5 step positions of the running risk.
    running = [0 / 1, 1 / 2, 1 / 3, 1 / 4, 2 / 5]
    assert curve["aurc"] == pytest.approx(sum(running) / 5)


def test_selective_classification(caches):
    heldout, test = caches
    res = selective_classification(test, risks=[0.05, 0.2])
    assert res["threshold_from"] == "empirical"
    # At the last exit; coverage at a risk is monotone in the risk.
    assert res["at_risk"][0]["coverage"] <= res["at_risk"][1]["coverage"]
    assert res["accuracy"] == anytime(test)["full_accuracy"]
    honest = selective_classification(test, policy=ew.get_policy("confidence", threshold=0.8),
                                       risks=[0.05, 0.2], heldout=heldout)
    assert honest["threshold_from"] == "heldout"
    for row in honest["at_risk"]:
        if row["threshold"] is not None:
            # The reported test numbers are those of the held-out threshold on the test rows.
            ex = replay(ew.get_policy("confidence", threshold=0.8), test).exit_index
            logits = test.logits[torch.arange(test.num_examples), ex]
            conf = torch.softmax(logits, -1).amax(-1)
            accept = conf >= row["threshold"]
            assert row["coverage"] == pytest.approx(float(accept.double().mean()))
    json.dumps(res)
    json.dumps(honest)


def test_auroc_by_hand():
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0.0
    # One tie counts one half: pairs (neg, pos): (.1,.2) win, (.1,.3) win, (.2,.2) tie, (.2,.3) win
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.2, 0.3])) == pytest.approx(3.5 / 4)
    with pytest.raises(InputError):
        auroc(torch.tensor([]), torch.tensor([0.1]))


def test_ood_auroc_with_the_window_policy(caches):
    _, test = caches
    ood = make_cache(n=200, seed=9, ood=True)
    policy = ew.get_policy("window", low=0.3, high=0.97)
    res = ood_auroc(policy, test, ood)
    assert 0.8 < res["auroc"] <= 1.0  # flat OOD logits are far more uncertain
    assert res["ood"]["rejected"] > res["in_dist"]["rejected"]
    # The score is the uncertainty at each row's exit.
    out_id, out_ood = window_outcome(policy, test), window_outcome(policy, ood)
    assert res["auroc"] == pytest.approx(auroc(out_id["uncertainty"], out_ood["uncertainty"]))
    ex = out_ood["replay"].exit_index
    u = policy.uncertainty(ood.logits[torch.arange(ood.num_examples), ex])
    torch.testing.assert_close(out_ood["uncertainty"], u)
    # Rejected rows left early (above the window) unless they reached the last exit.
    early = out_ood["rejected"] & (ex < 3)
    assert bool(early.any())
    assert "accuracy" in res["in_dist"] and "accuracy" not in res["ood"]
    json.dumps(res)
    with pytest.raises(ConfigError):
        window_outcome(ew.get_policy("entropy"), test)


def test_every_plot_writes_a_png(caches, tmp_path):
    heldout, test = caches
    ood = make_cache(n=100, seed=9, ood=True)
    policy = ew.get_policy("window", low=0.3, high=0.97)
    outs = [
        plot_anytime({"a": anytime(test), "b": anytime(heldout)}, tmp_path / "anytime.png"),
        plot_budgeted_batch(budgeted_batch(heldout, test, budgets=[0.4, 0.8]),
                            tmp_path / "bb.png"),
        plot_fixed_cost(fixed_cost_table(heldout, test), tmp_path / "fixed.png"),
        plot_overthinking(overthinking_report(test), tmp_path / "over.png"),
        plot_risk_coverage(selective_classification(test), tmp_path / "rc.png"),
        plot_ood_roc(ood_auroc(policy, test, ood), tmp_path / "roc.png"),
    ]
    for path in outs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="anytime"):
        plot_anytime(overthinking_report(test), tmp_path / "x.png")

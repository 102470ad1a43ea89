"""Certified thresholds: exact binomial bounds, the drop bound, fixed-sequence testing,
refusal on too few rows (exitwise.calibration.certify)."""

from __future__ import annotations

import math

import pytest
import torch
from test_threshold_search import known_cache

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, replay
from exitwise.calibration import CalibrationRefused, search_accuracy_drop
from exitwise.calibration.certify import (
    binomial_lower,
    binomial_upper,
    certify_candidates,
    drop_bound,
    minimum_rows,
)
from exitwise.errors import ConfigError


def test_exact_binomial_bounds_against_known_values():
    # zero events: 1 - alpha^(1/n)
    assert binomial_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** 0.1, abs=1e-9)
    # Clopper-Pearson one-sided 95% upper bound for 1 of 10 is 0.3942
    assert binomial_upper(1, 10, 0.05) == pytest.approx(0.39416, abs=1e-4)
    assert binomial_lower(9, 10, 0.05) == pytest.approx(1 - 0.39416, abs=1e-4)
    assert binomial_lower(0, 10, 0.05) == 0.0 and binomial_upper(10, 10, 0.05) == 1.0
    with pytest.raises(ConfigError):
        binomial_upper(11, 10, 0.05)


def test_the_drop_bound_credits_the_rows_only_the_early_exit_gets_right():
    # 1000 rows: 20 right at full depth but wrong early (a), 15 the other way round (b)
    n = 1000
    final = torch.ones(n, dtype=torch.bool)
    final[:15] = False
    early = torch.ones(n, dtype=torch.bool)
    early[15:35] = False
    bound, seen = drop_bound(early, final, delta=0.1)
    assert seen == pytest.approx((20 - 15) / n)
    want = binomial_upper(20, n, 0.05) - binomial_lower(15, n, 0.05)
    assert bound == pytest.approx(want)
    assert seen < bound < binomial_upper(20, n, 0.05)  # tighter than ignoring b


def test_minimum_rows_and_refusal_on_a_small_held_out_set():
    assert minimum_rows(0.01, 0.1) == math.ceil(math.log(0.05) / math.log(0.99))  # 299
    small = known_cache(200)
    with pytest.raises(CalibrationRefused, match="Hold out at least 299 rows"):
        search_accuracy_drop("confidence", small, max_drop_points=1.0, delta=0.1)


def test_certified_search_keeps_the_bound_within_the_target_and_is_never_bolder():
    cache = known_cache(2000)
    plain = search_accuracy_drop("confidence", cache, max_drop_points=1.0)
    sure = search_accuracy_drop("confidence", cache, max_drop_points=1.0, delta=0.1)
    assert sure.met_target and sure.heldout["certified_bound_points"] <= 1.0
    assert sure.heldout["testing"] == "fixed-sequence" and sure.heldout["delta"] == 0.1
    # the known cache: only settings with accuracy 1.0 (drop 0) can be certified at 1 point
    assert sure.heldout["accuracy"] == 1.0
    assert sure.heldout["flops_speedup"] <= plain.heldout["flops_speedup"] + 1e-9
    res = replay(sure.policy, cache)
    bound, _ = drop_bound(res.predictions == cache.labels,
                          cache.logits[:, -1].argmax(-1) == cache.labels, 0.1)
    assert bound * 100 == pytest.approx(sure.heldout["certified_bound_points"])


def test_fixed_sequence_stops_at_the_first_failure():
    """A cache where an aggressive setting looks fine but a safer one fails: fixed-sequence
    testing never reaches the aggressive one."""
    n = 3000
    labels = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 2, 2)
    logits[:, 1, 0] = 5.0  # the final exit is always right
    # exit 0: confidence 0.9 and right on 90% of rows, wrong on 10% of them
    wrong = torch.arange(n) % 10 == 0
    logits[:, 0, 0] = math.log(9.0)
    logits[wrong, 0, 0] = 0.0
    logits[wrong, 0, 1] = math.log(9.0)
    cache = ExitLogitsCache(logits, labels, torch.tensor([[1.0, 2.0]]).expand(n, 2),
                            torch.full((n,), 2.0), [1, 2])
    certified, method = certify_candidates(ew.get_policy("confidence"), cache, [1.0, 1.0],
                                           target=0.01, delta=0.1)
    assert method == "fixed-sequence"
    values = [p.value for p, *_ in certified]
    # thresholds above 0.9 keep everyone to the end (certified); 0.9 and below fail, so
    # nothing at or below 0.9 is certified even though the sweep goes on below it
    assert values and min(values) > 0.9
    assert all(b <= 0.01 for *_, b, _ in certified)


def test_policies_without_a_declared_direction_are_tested_with_bonferroni():
    from exitwise.policies.confidence import ConfidencePolicy

    class Undeclared(ConfidencePolicy):
        safer_when = None

    cache = known_cache(2000)
    certified, method = certify_candidates(Undeclared(), cache, [1.0] * 3, 0.01, 0.1)
    assert method == "bonferroni"
    # tested at delta / (grid size): never more settings than fixed-sequence testing keeps
    ordered, _ = certify_candidates(ew.get_policy("confidence"), cache, [1.0] * 3, 0.01, 0.1)
    assert certified and {p.value for p, *_ in certified} <= {p.value for p, *_ in ordered}


def test_regression_caches_are_refused_with_advice():
    n = 400
    cache = ExitLogitsCache(torch.randn(n, 2, 1), torch.randn(n),
                            torch.ones(n, 2), torch.ones(n), [1, 2])
    with pytest.raises(ConfigError, match="delta=None"):
        certify_candidates(ew.get_policy("patience"), cache, [1.0, 1.0], 0.01, 0.1)


def test_fixed_sequence_never_certifies_past_a_failed_setting():
    """Exit 0 is 0.97-confident and wrong on 10% of rows, 0.6-confident and right on the
    rest (where the final exit is wrong): settings below 0.6 look *better* than full depth,
    but the safer ones between fail first, so testing must stop there and certify none of
    them (a sweep that went on past the failure certified 0.5)."""
    n = 3000
    labels = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 2, 2)
    sure = torch.arange(n) < 300
    logits[sure, 0, 1] = math.log(0.97 / 0.03)
    logits[sure, 1, 0] = 5.0
    logits[~sure, 0, 0] = math.log(0.6 / 0.4)
    logits[~sure, 1, 1] = 5.0
    cache = ExitLogitsCache(logits, labels, torch.tensor([[1.0, 2.0]]).expand(n, 2),
                            torch.full((n,), 2.0), [1, 2])
    certified, _ = certify_candidates(ew.get_policy("confidence"), cache, [1.0, 1.0],
                                      target=0.01, delta=0.1)
    values = [p.value for p, *_ in certified]
    assert values and min(values) > 0.97

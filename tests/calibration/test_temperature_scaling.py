"""Per-exit temperature scaling and the calibration-error helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import exitwise as ew
from exitwise.analysis import ExitLogitsCache
from exitwise.calibration import (
    apply_temperatures,
    expected_calibration_error,
    fit_temperatures,
)
from exitwise.calibration.temperature import calibration_report
from exitwise.errors import ConfigError, InputError


def scaled_cache(scales: list[float], n: int = 800, seed: int = 0) -> ExitLogitsCache:
    """3-class cache: exit k = ``scales[k]`` x a calibrated logit vector (labels are drawn
    from its softmax), so the ideal temperature of exit k is about ``scales[k]``."""
    g = torch.Generator().manual_seed(seed)
    base = 2.0 * torch.randn(n, 3, generator=g)
    labels = torch.multinomial(torch.softmax(base, -1), 1, generator=g).squeeze(1)
    logits = torch.stack([s * base for s in scales], dim=1)
    e = len(scales)
    return ExitLogitsCache(logits, labels, torch.ones(n, e), torch.full((n,), float(e)),
                           list(range(1, e + 1)))


def nll(logits: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    return float(F.cross_entropy(logits / t, labels))


def test_fit_lowers_nll_and_ece_on_overconfident_exits() -> None:
    cache = scaled_cache([4.0, 1.0, 0.4])  # over-, well-, under-confident
    temps = fit_temperatures(cache)
    assert temps.shape == (3,) and temps.dtype == torch.float32
    assert 3.0 < temps[0] < 5.0 and 0.75 < temps[1] < 1.25 and 0.3 < temps[2] < 0.5
    over = cache.logits[:, 0]
    assert nll(over, cache.labels, float(temps[0])) < 0.8 * nll(over, cache.labels, 1.0)
    # Optimal: nudging T either way does not help.
    best = nll(over, cache.labels, float(temps[0]))
    for factor in (0.9, 1.1):
        assert best <= nll(over, cache.labels, float(temps[0]) * factor) + 1e-6
    report = calibration_report(cache, temps)
    assert report[0]["ece_after"] < report[0]["ece_before"]
    assert all(r["nll_after"] <= r["nll_before"] + 1e-9 for r in report)


def test_fit_clamps_to_range_and_checks_it() -> None:
    cache = scaled_cache([60.0])
    temps = fit_temperatures(cache, max_temperature=5.0)
    assert float(temps[0]) == pytest.approx(5.0)
    with pytest.raises(ConfigError):
        fit_temperatures(cache, min_temperature=2.0, max_temperature=1.0)


def test_fit_rejects_bad_caches() -> None:
    cache = scaled_cache([2.0, 1.0], n=20)
    with pytest.raises(InputError, match="empty"):
        fit_temperatures(cache.subset(torch.tensor([], dtype=torch.long)))
    nan = cache.subset(torch.arange(20))
    nan.logits[3, 1, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        fit_temperatures(nan)
    unlabeled = cache.subset(torch.arange(20))
    unlabeled.labels[5] = -1
    with pytest.raises(InputError, match="label"):
        fit_temperatures(unlabeled)


def test_expected_calibration_error_by_hand() -> None:
    # Two rows at confidence 0.9 (one right) and two at ~0.6 (both right), 10 bins:
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4.
    p_hi, p_lo = 0.9, 0.6
    logit = lambda p: torch.log(torch.tensor([p, 1 - p]))  # noqa: E731
    logits = torch.stack([logit(p_hi), logit(p_hi), logit(p_lo), logit(p_lo)])
    labels = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(logits, labels, bins=10) == pytest.approx(0.4, abs=1e-6)
    with pytest.raises(ConfigError):
        expected_calibration_error(logits, labels, bins=0)
    with pytest.raises(InputError):
        expected_calibration_error(logits, labels[:3])


def test_apply_temperatures_sets_the_model_buffer() -> None:
    blocks = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 4))
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="linear", num_labels=2))
    temps = torch.linspace(0.5, 2.0, model.num_exits)
    apply_temperatures(model, temps)
    assert torch.equal(model.temperatures, temps)
    with pytest.raises(InputError):
        apply_temperatures(model, torch.ones(model.num_exits + 1))
    with pytest.raises(InputError):
        apply_temperatures(model, -torch.ones(model.num_exits))

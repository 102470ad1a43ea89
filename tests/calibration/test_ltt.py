"""Learn-then-Test certification: known-risk synthetic losses, refusal, p-values, and the
loss helper on a tiny LM."""

from __future__ import annotations

import math

import pytest
import torch

from exitwise.calibration import CalibrationRefused, certify_threshold, early_exit_losses
from exitwise.calibration.ltt import hoeffding_bentkus_p_value, hoeffding_p_value, sequence_losses
from exitwise.errors import ConfigError, InputError

# threshold -> true risk: lower thresholds exit more and disagree more with the full model.
RATES = {1.0: 0.0, 0.9: 0.01, 0.8: 0.03, 0.7: 0.06, 0.6: 0.15, 0.5: 0.3, 0.4: 0.5}


def _bernoulli_losses(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {lam: (torch.rand(n, generator=g) < p).double() for lam, p in RATES.items()}


@pytest.mark.parametrize("method", ["hoeffding", "hoeffding_bentkus"])
def test_certifies_known_risk(method):
    eps, delta = 0.1, 0.05
    hits = []
    for seed in range(5):
        res = certify_threshold(_bernoulli_losses(2000, seed), eps, delta, method=method)
        assert res.threshold is not None
        # every certified threshold truly has risk <= eps (0.6 has 0.15 and must never pass)
        assert all(RATES[lam] <= eps for lam in res.certified)
        assert res.certified == sorted(res.certified, reverse=True)  # safest first
        hits.append(res.threshold)
    # with n = 2000 the 0.06-risk threshold is certified (its margin 0.04 is ample)
    assert all(h == 0.7 for h in hits)


def test_bentkus_is_tighter_than_hoeffding():
    for risk in (0.0, 0.02, 0.05, 0.08):
        assert hoeffding_bentkus_p_value(risk, 500, 0.1) <= hoeffding_p_value(risk, 500, 0.1)
    assert hoeffding_p_value(0.2, 500, 0.1) == 1.0
    assert hoeffding_p_value(0.0, 100, 0.1) == pytest.approx(math.exp(-2.0))


def test_refuses_too_small_set():
    # the count named is the method's own: Hoeffding exp(-2 n eps^2) <= delta at n >=
    # log(1/.05) / (2 * .01) = 149.8; Hoeffding-Bentkus' zero-loss p-value min(exp(-n KL(0 ||
    # eps)), e P[Bin(n, eps) = 0]) = .9^n <= .05 at n >= 28.4 (Hoeffding's count was quoted)
    with pytest.raises(CalibrationRefused, match="at least 150 sequences"):
        certify_threshold(_bernoulli_losses(20), epsilon=0.1, delta=0.05, method="hoeffding")
    with pytest.raises(CalibrationRefused, match="at least 29 sequences"):
        certify_threshold({0.5: [0.0] * 5}, epsilon=0.1, delta=0.05)


def test_no_threshold_certified_returns_none_with_reason():
    losses = {0.9: [1.0] * 300 + [0.0] * 700, 0.5: [1.0] * 1000}
    res = certify_threshold(losses, epsilon=0.1, delta=0.05)
    assert res.threshold is None and res.certified == []
    assert "no threshold is certified" in res.reason
    assert list(res.p_values) == [0.9]  # fixed-sequence testing stops at the first failure


def test_fixed_sequence_stops_at_first_failure():
    n = 1000
    losses = {0.9: [0.0] * n, 0.8: [1.0] * n, 0.7: [0.0] * n}  # 0.7 never tested
    res = certify_threshold(losses, 0.1, 0.05)
    assert res.threshold == 0.9 and 0.7 not in res.p_values
    asc = certify_threshold({0.1: [0.0] * n, 0.2: [0.0] * n}, 0.1, 0.05, order="ascending")
    assert asc.threshold == 0.2


def test_bad_inputs():
    with pytest.raises(ConfigError, match="epsilon"):
        certify_threshold({0.5: [0.0]}, epsilon=0.0, delta=0.1)
    with pytest.raises(ConfigError, match="delta"):
        certify_threshold({0.5: [0.0]}, epsilon=0.1, delta=1.5)
    with pytest.raises(ConfigError, match="method"):
        certify_threshold({0.5: [0.0]}, 0.1, 0.1, method="chernoff")
    with pytest.raises(InputError, match="same n"):
        certify_threshold({0.5: [0.0] * 3, 0.4: [0.0] * 4}, 0.1, 0.1)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        certify_threshold({0.5: [2.0]}, 0.1, 0.1)
    with pytest.raises(InputError, match="empty"):
        certify_threshold({}, 0.1, 0.1)


def test_sequence_losses():
    cand = [[5, 6, 7], [5, 6], [1, 2, 3]]
    ref = [[5, 6, 7], [5, 6, 9], [1, 4, 3]]
    assert sequence_losses(cand, ref) == [0.0, pytest.approx(1 / 3), pytest.approx(1 / 3)]
    assert sequence_losses(cand, ref, kind="sequence") == [0.0, 1.0, 1.0]


def test_early_exit_losses_on_tiny_lm():
    from helpers.lmkit import EOS, left_padded, tiny_lm

    model = tiny_lm("llama")
    ids, mask = left_padded((5, 4, 6, 3))
    losses = early_exit_losses(
        model, ids, mask, "calm_saturation", [1.0, 0.0], max_new_tokens=6,
        policy_params={"tau": 0.0}, eos_token_id=EOS,
    )
    assert losses[1.0] == [0.0] * 4  # never exits: identical to greedy
    assert len(losses[0.0]) == 4 and max(losses[0.0]) > 0.0  # always exits at layer 1
    # early exit's own options reach early exit only, not the greedy reference
    deeper = early_exit_losses(
        model, ids, mask, "calm_saturation", [1.0, 0.0], max_new_tokens=6,
        policy_params={"tau": 0.0}, eos_token_id=EOS, exit_layers=[3],
    )
    assert deeper[1.0] == [0.0] * 4 and len(deeper[0.0]) == 4

"""The window cascade's window around the operating threshold and its ensemble of the exits
seen, and ZTW's ensemble over the internal classifiers only (the final exit keeps its own
prediction), against hand-computed values; runtime == replay for both on a tiny CNN."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.cnn import sdn_cnn_with_cache

import exitwise as ew
from exitwise.analysis import replay
from exitwise.errors import ConfigError
from exitwise.policies import ztw_ensemble


def probs_logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).log()


# -- window ----------------------------------------------------------------------------------
def test_window_sits_around_the_operating_threshold():
    # max_prob uncertainty u = 1 - max p: 0.3 (confident), 0.45 (near t), 0.7 (far above t)
    logits = probs_logits([[0.7, 0.1, 0.1, 0.1], [0.55, 0.15, 0.15, 0.15],
                           [0.3, 0.25, 0.25, 0.2]])
    policy = ew.get_policy("window", threshold=0.5, width=0.1, measure="max_prob")
    assert policy.param == "width" and (policy.low, policy.high) == (0.4, 0.6)
    done, state = policy.decide(0, 3, logits, policy.init_state(3))
    assert done.tolist() == [True, False, True]  # only the row near t = 0.5 goes deeper
    assert state["rejected"].tolist() == [False, False, True]  # the decision: u > t
    torch.testing.assert_close(state["uncertainty"], torch.tensor([0.3, 0.45, 0.7]))
    wide = policy.with_param(0.3)  # window [0.2, 0.8]: everyone is too close to call
    assert not bool(wide.decide(0, 3, logits, wide.init_state(3))[0].any())
    with pytest.raises(ConfigError, match="not both"):
        ew.get_policy("window", threshold=0.5, low=0.1)
    assert ew.get_policy("window", threshold=0.4, tune="threshold").grid(3)[-1] == 1.0


def test_window_ensembles_the_exits_seen():
    p0 = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    p1 = torch.tensor([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]])
    policy = ew.get_policy("window", threshold=0.5, width=0.05, ensemble=True)
    assert policy.transforms_output
    state = policy.init_state(2)
    _, state = policy.decide(0, 3, p0.log(), state)
    mean = (p0 + p1) / 2  # the deep ensemble's prediction at exit 1
    out = policy.output_logits(1, 3, p1.log(), state)
    torch.testing.assert_close(out, mean.log())
    _, state = policy.decide(1, 3, p1.log(), state)
    entropy = -(mean * mean.log()).sum(-1) / math.log(3)
    torch.testing.assert_close(state["uncertainty"], entropy)
    alone = ew.get_policy("window", threshold=0.5, width=0.05)
    assert not alone.transforms_output
    torch.testing.assert_close(alone.output_logits(1, 3, p1.log(), {}), p1.log())


# -- ZTW: the final exit is not in the ensemble ---------------------------------------------
def test_ztw_rows_for_the_internal_classifiers_leave_the_final_exit_its_own():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 3, 4, generator=g) * 2
    weights = [[1.0], [0.4, 0.9]]  # two ICs, the third exit is the network's own head
    biases = [[0.0] * 4, [0.5, 0.0, -0.5, 0.0]]
    ens = ztw_ensemble(z, weights, biases)
    logp = z.log_softmax(-1)
    torch.testing.assert_close(ens[:, 0], (logp[:, 0] + torch.tensor(biases[0])).log_softmax(-1))
    torch.testing.assert_close(
        ens[:, 1],
        (0.4 * logp[:, 0] + 0.9 * logp[:, 1] + torch.tensor(biases[1])).log_softmax(-1))
    torch.testing.assert_close(ens[:, 2], logp[:, 2])  # the final exit's own prediction
    policy = ew.get_policy("ztw", threshold=0.7, weights=weights, biases=biases)
    state = policy.init_state(6)
    for k in range(2):
        _, state = policy.decide(k, 3, z[:, k], state)
    torch.testing.assert_close(policy.output_logits(2, 3, z[:, 2], state), logp[:, 2])
    with pytest.raises(ConfigError, match="2 exits"):
        policy.decide(0, 5, z[:, 0], policy.init_state(6))


# -- runtime == replay -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    return sdn_cnn_with_cache()


def test_ensemble_window_and_ic_only_ztw_agree_between_runtime_and_replay(cnn):
    model, x, cache = cnn
    u0 = ew.get_policy("window").uncertainty(cache.logits[:, 0])
    t = float(u0.median())
    ens = model.attach_ensemble()  # ZTW's ensemble over the 3 ICs of this 4-exit model
    with torch.no_grad():
        ens.raw_weight.normal_()
        ens.bias.normal_()
    policies = [
        ew.get_policy("window", threshold=t, width=float((u0 - t).abs().median()),
                      ensemble=True),
        ew.get_policy("ztw", threshold=0.6, **ens.to_dict()),
    ]
    for policy in policies:
        live = model.early_exit(policy, pixel_values=x)
        offline = replay(policy, cache, model.temperatures)
        assert torch.equal(live.exit_index, offline.exit_index), policy
        assert torch.equal(live.predictions, offline.predictions), policy
        torch.testing.assert_close(live.logits, offline.outputs, atol=1e-5, rtol=1e-5)
        assert len(set(live.exit_index.tolist())) >= 2, policy  # not a trivial agreement
    model.ensemble = None

"""Contract every registered exit policy keeps (new policies are picked up automatically).

A policy whose defaults cannot run on their own gets its construction parameters in
``CONTRACT_PARAMS``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import exitwise as ew
from exitwise.errors import ConfigError, InputError
from exitwise.policies import policy_from_dict

B, C, NUM_EXITS = 5, 3, 4
CONTRACT_PARAMS: dict[str, dict] = {}


def make(name: str) -> ew.ExitPolicy:
    return ew.get_policy(name, **CONTRACT_PARAMS.get(name, {}))


@pytest.fixture(params=ew.POLICIES.names())
def policy(request):
    return make(request.param)


def decide_args(policy: ew.ExitPolicy, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, generator=g) * 3
    labels = torch.randint(0, C, (B,), generator=g) if policy.needs_labels else None
    return logits, labels


def decide(policy: ew.ExitPolicy, k: int, logits, state, labels, seed: int = 0):
    """``policy.decide``, with a (B,) learned exit score (in (0, 1), fixed by ``seed``) for
    policies that read one, as the executor and the replay pass it."""
    extra = {}
    if policy.uses_scores:
        g = torch.Generator().manual_seed(1000 + seed)
        extra["scores"] = torch.rand(logits.shape[0], generator=g)
    return policy.decide(k, NUM_EXITS, logits, state, labels, **extra)


def assert_batch_state(state: dict, b: int) -> None:
    assert isinstance(state, dict)
    for key, value in state.items():
        assert isinstance(value, torch.Tensor), key
        assert value.shape[0] == b, key


def test_decide_shapes_and_state(policy):
    state = policy.init_state(B)
    assert_batch_state(state, B)
    for k in range(NUM_EXITS - 1):
        logits, labels = decide_args(policy, seed=k)
        done, state = decide(policy, k, logits, state, labels)
        assert done.shape == (B,) and done.dtype == torch.bool
        assert_batch_state(state, B)


def test_keep_subsets_state(policy):
    logits, labels = decide_args(policy)
    _, state = decide(policy, 0, logits, policy.init_state(B), labels)
    rows = torch.tensor([3, 0])
    kept = policy.keep(state, rows)
    assert kept.keys() == state.keys()
    for key in state:
        assert torch.equal(kept[key], state[key][rows]), key
    assert_batch_state(policy.keep(state, torch.tensor([], dtype=torch.long)), 0)


def test_decisions_are_per_row(policy):
    # A row's decision depends on its own logits and state only, not on its neighbours.
    state = policy.init_state(B)
    alone_states = [policy.init_state(1) for _ in range(B)]
    for k in range(NUM_EXITS - 1):
        logits, labels = decide_args(policy, seed=10 + k)
        extra = {}
        if policy.uses_scores:
            extra["scores"] = torch.rand(B, generator=torch.Generator().manual_seed(k))
        done, state = policy.decide(k, NUM_EXITS, logits, state, labels, **extra)
        for r in range(B):
            lab = None if labels is None else labels[r : r + 1]
            one = {key: v[r : r + 1] for key, v in extra.items()}
            d, alone_states[r] = policy.decide(
                k, NUM_EXITS, logits[r : r + 1], alone_states[r], lab, **one
            )
            assert bool(d[0]) == bool(done[r])


def test_grid_values_are_accepted(policy):
    grid = policy.grid(NUM_EXITS)
    assert len(grid) >= 1
    for value in grid:
        other = policy.with_param(value)
        assert type(other) is type(policy)
        if policy.param in other.params:
            assert other.value == value
        # every other parameter is kept
        for key, v in policy.params.items():
            if key != policy.param:
                assert other.params[key] == v


def test_dict_round_trip(policy):
    data = policy.to_dict()
    assert data["name"] == policy.registered_name
    again = policy_from_dict(data)
    assert type(again) is type(policy) and again.to_dict() == data


def test_check_logits(policy):
    policy.check_logits(torch.zeros(2, C))
    with pytest.raises(InputError, match="NaN"):
        policy.check_logits(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(InputError, match="inf"):
        policy.check_logits(torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(InputError, match="batch, classes"):
        policy.check_logits(torch.zeros(C))


@pytest.fixture(scope="module")
def plain_model():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(NUM_EXITS)]
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 6))
    return ew.attach_exits(backbone, layers="all", head="linear", num_labels=C).eval()


def scored_model(scorer: str) -> ew.MultiExitModel:
    """The same kind of model with a learned exit scorer, for policies that read one."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(NUM_EXITS)]
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 6))
    model = ew.attach_exits(backbone, layers="all", head="linear", num_labels=C)
    model.attach_scorer(scorer)
    return model.eval()


@pytest.fixture
def tiny_model(policy, plain_model):
    return scored_model(policy.scorer) if policy.uses_scores else plain_model


@pytest.mark.parametrize("name", [n for n in ew.POLICIES.names() if make(n).uses_scores])
def test_a_policy_reads_only_its_own_scorer(name):
    # lte, cats and dact once ran on each other's scores (a certainty read as a consistency)
    policy = make(name)
    from exitwise.analysis import collect_exit_logits, replay

    for other in {"lte", "cats", "dact"} - {policy.scorer}:
        model, x = scored_model(other), torch.randn(B, 6)
        with pytest.raises(InputError, match=f"come from the {other!r} scorer"):
            model.early_exit(policy, pixel_values=x)
        batch = ({"pixel_values": x}, torch.zeros(B, dtype=torch.long))
        cache = collect_exit_logits(model, [batch], progress=False)
        assert cache.meta["scorer"] == other
        with pytest.raises(InputError, match=f"come from the {other!r} scorer"):
            replay(policy, cache)
    with pytest.raises(InputError, match=f"the {policy.scorer_strategy!r} strategy"):
        policy.check_scorer(None, present=False)


def test_runs_in_the_executor(policy, tiny_model):
    x = torch.randn(B, 6)
    labels = torch.randint(0, C, (B,)) if policy.needs_labels else None
    res = tiny_model.early_exit(policy, labels=labels, pixel_values=x)
    assert res.exit_index.shape == (B,) and bool((res.exit_index >= 0).all())
    assert bool((res.exit_index < NUM_EXITS).all())


def test_nan_logits_raise_input_error_via_runtime(policy, tiny_model):
    with torch.no_grad():
        bias = tiny_model.heads[0].classifier.bias
        saved = bias.clone()
        bias[1] = float("nan")
    try:
        labels = torch.zeros(B, dtype=torch.long) if policy.needs_labels else None
        with pytest.raises(InputError, match="NaN"):
            tiny_model.early_exit(policy, labels=labels, pixel_values=torch.randn(B, 6))
    finally:
        with torch.no_grad():
            bias.copy_(saved)


@pytest.mark.parametrize(
    "name, params",
    [
        ("confidence", {"threshold": 1.5}),
        ("confidence", {"threshold": -0.1}),
        ("confidence", {"threshold": float("nan")}),
        ("confidence", {"threshold": "high"}),
        ("entropy", {"threshold": -1}),
        ("patience", {"patience": 0}),
        ("patience", {"patience": 1.5}),
        ("patience_confidence", {"threshold": 1.5}),
        ("patience_confidence", {"patience": 0}),
        ("static", {"exit": -1}),
        # not numbers: once accepted, then a TypeError inside torch (or True meaning 1)
        ("confidence", {"threshold": "0.9"}),
        ("confidence", {"threshold": None}),
        ("fastbert", {"speed": "0.3"}),
        ("patience", {"patience": True}),
        ("static", {"exit": 1.5}),
    ],
)
def test_out_of_range_parameters(name, params):
    with pytest.raises(ConfigError):
        ew.get_policy(name, **params)


def test_with_param_checks_range():
    with pytest.raises(ConfigError):
        ew.get_policy("confidence").with_param(2.0)
    assert math.isclose(ew.get_policy("entropy").with_param(0.5).value, 0.5)


def test_unknown_policy_or_parameter():
    with pytest.raises(ConfigError) as err:
        ew.get_policy("no-such-policy")
    for name in ew.POLICIES.names():
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="bad parameters"):
        ew.get_policy("entropy", treshold=0.1)


def test_a_declared_safer_direction_is_monotone(policy):
    """Certified calibration tests settings from the safest on, trusting ``safer_when``: along
    that order, no row may ever leave earlier (checked on a random cache)."""
    direction = getattr(policy, "safer_when", None)
    if direction is None or policy.needs_labels:
        pytest.skip("no declared direction")
    assert direction in ("higher", "lower")
    from exitwise.analysis import ExitLogitsCache, replay

    g = torch.Generator().manual_seed(7)
    n = 300
    cache = ExitLogitsCache(torch.randn(n, NUM_EXITS, C, generator=g) * 2,
                            torch.randint(0, C, (n,), generator=g),
                            torch.arange(1.0, NUM_EXITS + 1).expand(n, NUM_EXITS),
                            torch.full((n,), float(NUM_EXITS)), list(range(1, NUM_EXITS + 1)),
                            scores=torch.rand(n, NUM_EXITS, generator=g))
    values = sorted(policy.grid(NUM_EXITS), reverse=direction == "higher")  # safest first
    previous = None
    for v in values:
        exits = replay(policy.with_param(v), cache).exit_index
        if previous is not None:
            assert bool((exits <= previous).all()), f"{policy.registered_name} at {v}"
        previous = exits

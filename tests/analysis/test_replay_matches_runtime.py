"""Offline replay on cached logits == the real executor, for every encoder family and policy.

Tiny random encoders with random heads; per-exit temperatures (set from the raw logits'
spread, well below 1) make the confidences cover the policies' grids, and each policy's
parameter is picked from its own grid so that decisions are mixed (some rows
leave early, some run to the end) and stable under tiny logit noise (so float round-off
between batch shapes cannot flip a decision).
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import ENCODER_FAMILIES, padded_batch, tiny_encoder

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, collect_exit_logits, replay

LENGTHS = (7, 4, 9, 5, 3, 8, 6, 2, 9, 1)
LABELS = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])


@functools.lru_cache(maxsize=None)
def _model_and_cache(family: str, scorer: str | None = None):
    """A tiny encoder with exits (and a randomly initialised learned exit ``scorer``, for
    the policies that read one) and the cache of its exit logits."""
    model = ew.attach_exits(
        tiny_encoder(family), ew.ExitConfig(layers="all", head="pooler", num_labels=2, dropout=0.0)
    )
    if scorer is not None:
        torch.manual_seed(1)
        model.attach_scorer(scorer)
        with torch.no_grad():  # spread the scores over (0, 1) so thresholds split the rows
            for m in model.scorer.modules():
                if isinstance(m, torch.nn.Linear) and m.out_features == 1:
                    m.weight.mul_(20.0)
    model.eval()
    batch = padded_batch(lengths=LENGTHS, pad_id=model.backbone.config.pad_token_id)
    cache = collect_exit_logits(model, [dict(batch, labels=LABELS)], progress=False)
    # Temperatures do not enter the cache (raw logits); pick them so that the median top-2
    # margin becomes 2 after scaling, i.e. confidences around 0.88.
    top2 = cache.logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).median(dim=0).values
    model.temperatures.copy_((margin / 2).clamp_min(1e-3))
    return model, batch, cache


def _jittered(cache: ExitLogitsCache, seed: int) -> ExitLogitsCache:
    g = torch.Generator().manual_seed(seed)
    noise = 1e-4 * torch.randn(cache.logits.shape, generator=g)
    return ExitLogitsCache(cache.logits + noise, cache.labels, cache.costs, cache.full_cost,
                           cache.exit_layers, scores=cache.scores)


def _pick_policy(name: str, cache: ExitLogitsCache, temps: torch.Tensor) -> ew.ExitPolicy:
    """The grid value with the most mixed exits whose decisions survive logit jitter."""
    base = ew.get_policy(name)
    last = cache.num_exits - 1
    jittered = [_jittered(cache, s) for s in range(3)]
    best, best_score = None, None
    for value in base.grid(cache.num_exits):
        policy = base.with_param(value)
        idx = replay(policy, cache, temps).exit_index
        mixed = bool((idx < last).any() and (idx == last).any())
        score = (mixed, len(set(idx.tolist())), -abs(float((idx < last).double().mean()) - 0.5))
        if best_score is not None and score <= best_score:
            continue
        if all(torch.equal(replay(policy, j, temps).exit_index, idx) for j in jittered):
            best, best_score = policy, score
    assert best is not None, f"no stable setting for {name}"
    return best


@pytest.mark.parametrize("policy_name", ew.POLICIES.names())
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_replay_equals_runtime(family: str, policy_name: str) -> None:
    model, batch, cache = _model_and_cache(family, ew.POLICIES.get(policy_name).scorer)
    policy = _pick_policy(policy_name, cache, model.temperatures)
    labels = LABELS if policy.needs_labels else None
    live = model.early_exit(policy, labels=labels, **batch)
    offline = replay(policy, cache, model.temperatures)

    assert torch.equal(offline.exit_index, live.exit_index)
    assert torch.equal(offline.predictions, live.predictions)
    assert torch.equal(offline.exit_layer, live.exit_layer)
    # Same cost table (each row's cost depends only on its own tokens): exactly equal.
    assert torch.equal(offline.costs, live.flops)
    # The logits the executor returns are the cached ones at the same exit, temperature-scaled
    # (for an ensemble policy: its output, whose argmax the replay's predictions equal above).
    rows = torch.arange(cache.num_examples)
    expected = cache.logits[rows, live.exit_index] / model.temperatures[live.exit_index, None]
    if policy.transforms_output:  # what the runtime returned is what replay reports
        assert offline.outputs is not None
        torch.testing.assert_close(live.logits, offline.outputs, atol=2e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(live.logits, expected, atol=2e-4, rtol=1e-4)


def test_policies_get_mixed_decisions_somewhere() -> None:
    """The picker is not vacuous: threshold policies do split rows on these models."""
    for family in ("bert", "deberta-v2"):
        model, _, cache = _model_and_cache(family)
        last = cache.num_exits - 1
        for name in ("confidence", "entropy", "patience_confidence"):
            policy = _pick_policy(name, cache, model.temperatures)
            idx = replay(policy, cache, model.temperatures).exit_index
            assert (idx < last).any() and (idx == last).any(), (family, name)


def test_cache_shapes_and_costs_match_model() -> None:
    model, batch, cache = _model_and_cache("distilbert")
    n, e = len(LENGTHS), model.num_exits
    assert cache.logits.shape == (n, e, 2) and cache.logits.dtype == torch.float32
    assert cache.costs.shape == (n, e) and cache.costs.dtype == torch.float64
    assert cache.exit_layers == model.exit_layers
    assert torch.equal(cache.labels, LABELS)
    # Deeper exits cost more; longer rows cost more; raw logits equal model.forward's.
    assert bool((cache.costs.diff(dim=1) > 0).all())
    assert cache.costs[2, 0] > cache.costs[0, 0] > cache.costs[1, 0]
    with torch.inference_mode():
        outs = model(**batch).stacked()
    torch.testing.assert_close(cache.logits, outs)


def test_collect_over_several_batches_and_unlabeled_rows() -> None:
    model, batch, cache = _model_and_cache("bert")
    halves = [
        {k: v[:4] for k, v in batch.items()},
        {k: v[4:] for k, v in batch.items()},  # no labels: -1
    ]
    two = collect_exit_logits(model, halves, progress=False)
    assert two.labels.tolist() == [-1] * len(LENGTHS)
    torch.testing.assert_close(two.logits, cache.logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(two.costs, cache.costs)
    assert torch.equal(two.full_cost, cache.full_cost)


def test_sequential_backbone_with_tuple_batches() -> None:
    """(inputs, labels) batches from a DataLoader, a plain nn.Sequential backbone."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()),
    )
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 6))
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="linear", num_labels=3,
                                                   dropout=0.0)).eval()
    x, y = torch.randn(23, 6), torch.randint(0, 3, (23,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    cache = collect_exit_logits(model, loader, progress=False)
    assert cache.logits.shape == (23, 3, 3) and torch.equal(cache.labels, y)
    top2 = cache.logits.topk(2, dim=-1).values
    model.temperatures.copy_((top2[..., 0] - top2[..., 1]).median(dim=0).values / 2)
    for name in ("confidence", "patience", "oracle"):
        policy = _pick_policy(name, cache, model.temperatures)
        live = model.early_exit(policy, labels=y if policy.needs_labels else None, pixel_values=x)
        offline = replay(policy, cache, model.temperatures)
        assert torch.equal(offline.exit_index, live.exit_index), name
        assert torch.equal(offline.costs, live.flops), name

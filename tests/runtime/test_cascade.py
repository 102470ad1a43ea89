"""The model cascade (``cascade.py``, ``runtime/cascade.py``, ``analysis/cascade.py``): decisions by hand on
fixed logits, the later member really running on the remaining rows only, runtime == offline
replay on tiny models, save/load without pickle, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import padded_batch, tiny_encoder

import exitwise as ew
from exitwise.analysis.cascade import collect_cascade_logits, replay_cascade
from exitwise.calibration import search_accuracy_drop
from exitwise.cascade import ModelCascade, cascade_members
from exitwise.runtime.cascade import cascade_policy, time_cascade
from exitwise.runtime.flops import full_depth_cost

LENGTHS = (7, 4, 9, 5)


def members(num_labels: int = 3, seed: int = 0) -> list[ew.MultiExitModel]:
    """A 2-block truncation and the full 4-block tiny BERT, single exit each, sharpened heads
    (so that confidences spread over (1/C, 1))."""
    models = cascade_members(tiny_encoder("bert", seed=seed), (2, None), num_labels=num_labels,
                             head="linear", dropout=0.0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in models:
            m.heads[-1].classifier.weight.normal_(0.0, 2.0)
    return [m.eval() for m in models]


def fixed_logits(model: ew.MultiExitModel, table: torch.Tensor, seen: list[list[int]],
                 shapes: list | None = None) -> None:
    """Make ``model.full_depth`` return ``table[row id]``, the row id being the first token
    (ids 10, 11, ... for rows 0, 1, ...); record the row ids (and input shapes) of each call."""

    def full_depth(**inputs):
        ids = (inputs["input_ids"][:, 0] - 10).tolist()
        seen.append(ids)
        if shapes is not None:
            shapes.append({k: tuple(v.shape) for k, v in inputs.items()})
        return table[ids]

    model.full_depth = full_depth


def row_batch() -> dict[str, torch.Tensor]:
    batch = padded_batch(LENGTHS)
    batch["input_ids"][:, 0] = torch.arange(10, 10 + len(LENGTHS))
    return batch


def test_decisions_by_hand_on_fixed_logits():
    """threshold 0.8: member 0's confidences sigmoid(2)=.881, .5, sigmoid(3)=.953, sigmoid(1)=
    .731 -> rows 0, 2 leave at member 0; member 1 sees rows 1 and 3 only."""
    small, large = members(num_labels=2)
    first = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    second = torch.tensor([[9.0, 0.0], [0.0, 5.0], [9.0, 0.0], [4.0, 0.0]])
    seen0: list[list[int]] = []
    seen1: list[list[int]] = []
    shapes: list[dict] = []
    fixed_logits(small, first, seen0)
    fixed_logits(large, second, seen1, shapes)
    cascade = ModelCascade([small, large])
    batch = row_batch()
    res = cascade.run(0.8, **batch)
    assert seen0 == [[0, 1, 2, 3]] and seen1 == [[1, 3]]
    assert res.member.tolist() == [0, 1, 0, 1]
    assert res.exit_layer.tolist() == [2, 6, 2, 6]
    assert res.predictions.tolist() == [0, 1, 1, 0]
    torch.testing.assert_close(res.logits, torch.stack([first[0], second[1], first[2],
                                                        second[3]]))
    assert res.rows_per_member == [4, 2]
    # FLOPs: member 0's full depth for every row, plus member 1's for rows 1 and 3
    c0 = full_depth_cost(small, small.backbone.start(**batch))
    c1 = full_depth_cost(large, large.backbone.start(**batch))
    torch.testing.assert_close(res.flops, c0 + c1 * torch.tensor([0.0, 1.0, 0.0, 1.0],
                                                                 dtype=torch.float64))
    # member 1 got the 2 remaining rows' inputs, trimmed to their longest real length (4, 5)
    assert shapes == [{"input_ids": (2, 5), "attention_mask": (2, 5)}]
    # a temperature on member 0 (T=2: [1, 0] -> .731) sends row 0 on too
    small.temperatures[-1] = 2.0
    seen1.clear()
    res = cascade.run(0.8, **batch)
    assert res.member.tolist() == [1, 1, 0, 1] and seen1[-1] == [0, 1, 3]
    torch.testing.assert_close(res.logits[2], first[2] / 2.0)
    # threshold 1 (nobody is that sure) runs everyone through both; 0 stops all at member 0
    assert cascade.run(1.0, **batch).member.tolist() == [1, 1, 1, 1]
    seen1.clear()
    assert cascade.run(0.0, **batch).member.tolist() == [0, 0, 0, 0] and seen1 == []


def _loader(n: int = 24, size: int = 8, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, size):
        lengths = [int(x) for x in torch.randint(2, 12, (size,), generator=g)]
        batch = padded_batch(tuple(lengths), seed=seed + s)
        batch["labels"] = torch.randint(0, 3, (size,), generator=g)
        out.append(batch)
    return out


def test_runtime_matches_replay_on_tiny_models():
    cascade = ModelCascade(members())
    cascade.members[0].temperatures[-1] = 1.3
    loader = _loader()
    cache = collect_cascade_logits(cascade, loader)
    assert cache.exit_layers == [2, 6] and cache.num_exits == 2
    assert cache.meta["cascade"]["member_layers"] == [2, 4]
    conf = torch.softmax(cache.logits[:, 0] / 1.3, -1).amax(-1)
    threshold = float(conf.median())  # half the rows go on to member 1
    off = replay_cascade(threshold, cache, cascade)
    assert 0 < int(off.exit_histogram[0]) < cache.num_examples
    # member 1's blocks really run on the remaining rows only
    sizes: list[int] = []
    handle = cascade.members[1].backbone.block(0).register_forward_pre_hook(
        lambda mod, args: sizes.append(int(args[0].shape[0])))
    try:
        runs = [cascade.run(threshold, count_flops=False, **b) for b in loader]
    finally:
        handle.remove()
    assert sizes == [r.rows_per_member[1] for r in runs if len(r.rows_per_member) > 1]
    assert sum(sizes) == int(off.exit_histogram[1]) and all(n < 8 for n in sizes)
    runs = [cascade.run(threshold, **b) for b in loader]
    run_index = torch.cat([r.member for r in runs])
    assert torch.equal(run_index, off.exit_index)
    assert torch.equal(torch.cat([r.predictions for r in runs]), off.predictions)
    rows = torch.arange(cache.num_examples)
    torch.testing.assert_close(torch.cat([r.flops for r in runs]), cache.costs[rows, off.exit_index])
    # the cache's reference cost is the largest member alone; costs are cumulative
    full = torch.cat([full_depth_cost(cascade.members[1], cascade.members[1].backbone.start(
        **{k: v for k, v in b.items() if k != "labels"})) for b in loader])
    torch.testing.assert_close(cache.full_cost, full)
    assert bool((cache.costs[:, 1] > cache.full_cost).all())
    # a policy object and a one-item threshold list decide the same as the float
    for spec in (ew.get_policy("confidence", threshold=threshold), [threshold]):
        assert torch.equal(replay_cascade(spec, cache, cascade).exit_index, off.exit_index)
    # the calibration searches run on the cascade cache as on any other: a threshold for
    # at most a 50-point drop against the largest member, found offline, decides the same live
    found = search_accuracy_drop("confidence", cache, cascade.temperatures, max_drop_points=50)
    assert found.heldout["full_accuracy"] == pytest.approx(
        float((cache.logits[:, 1].argmax(-1) == cache.labels).float().mean()))
    live = torch.cat([cascade.run(found.policy, **b).member for b in loader])
    assert torch.equal(live, replay_cascade(found.policy, cache, cascade).exit_index)
    # any per-row policy works (entropy here), runtime == replay
    ent = ew.get_policy("entropy", threshold=0.9)
    runs = torch.cat([cascade.run(ent, **b).member for b in loader])
    assert torch.equal(runs, replay_cascade(ent, cache, cascade).exit_index)


def test_three_members_with_one_threshold_per_boundary():
    models = cascade_members(tiny_encoder("bert", seed=1), (1, 2, None), num_labels=3,
                             head="linear", dropout=0.0)
    cascade = ModelCascade([m.eval() for m in models])
    assert cascade.member_layers == [1, 2, 4] and cascade.cumulative_layers == [1, 3, 7]
    loader = _loader(16)
    cache = collect_cascade_logits(cascade, loader)
    t = [float(cache.logits[:, 0].softmax(-1).amax(-1).median()),
         float(cache.logits[:, 1].softmax(-1).amax(-1).median())]
    policy = cascade_policy(t, 3)
    assert policy.registered_name == "budget" and policy.active_thresholds == t
    off = replay_cascade(t, cache, cascade)
    run = torch.cat([cascade.run(t, **b).member for b in loader])
    assert torch.equal(run, off.exit_index)
    assert set(run.tolist()) == {0, 1, 2}


def test_save_load_round_trip(tmp_path):
    cascade = ModelCascade(members(), policy=0.7)
    cascade.members[1].temperatures[-1] = 1.5
    folder = cascade.save_pretrained(tmp_path / "casc")
    manifest = json.loads((folder / "cascade.json").read_text())
    assert manifest["members"] == ["member-0", "member-1"]
    assert manifest["member_layers"] == [2, 4]
    assert manifest["policy"] == {"name": "confidence", "threshold": 0.7}
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    loaded = ModelCascade.from_pretrained(folder)
    assert loaded.member_layers == [2, 4] and not loaded.training
    torch.testing.assert_close(loaded.temperatures, cascade.temperatures)
    for a, b in zip(cascade.members, loaded.members):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = padded_batch(LENGTHS)
    want, got = cascade.run(**batch), loaded.run(profile=True, **batch)  # the stored policy
    assert len(got.layer_seconds) == len(got.rows_per_member) >= 1
    assert torch.equal(want.member, got.member)
    torch.testing.assert_close(want.logits, got.logits)


def test_clear_errors(tmp_path):
    small, large = members(num_labels=3)
    with pytest.raises(ew.ConfigError, match="at least one member"):
        ModelCascade([])
    with pytest.raises(ew.ConfigError, match="2 labels, member 1 has 3"):
        ModelCascade([members(num_labels=2)[0], large])
    with pytest.raises(ew.ConfigError, match="MultiExitModel"):
        ModelCascade([small, torch.nn.Linear(2, 2)])
    cascade = ModelCascade([small, large])
    batch = padded_batch(LENGTHS)
    with pytest.raises(ew.InputError, match="policy or a confidence threshold"):
        cascade.run(**batch)
    with pytest.raises(ew.ConfigError, match="2 thresholds for a cascade of 2"):
        cascade.run([0.5, 0.6], **batch)
    with pytest.raises(ew.ConfigError, match="outside its range"):
        cascade.run(1.5, **batch)
    with pytest.raises(ew.InputError, match="exit score"):
        cascade.run(ew.get_policy("lte"), **batch)
    # regression members: a confidence threshold means nothing for them
    reg = cascade_members(tiny_encoder("bert"), (2, None), num_labels=1, head="linear")
    with pytest.raises(ew.ConfigError, match="classification criterion"):
        ModelCascade(reg).run(0.9, **batch)
    with pytest.raises(ew.ConfigError, match="classification criterion"):
        ModelCascade(reg, policy=0.9)
    with pytest.raises(ew.ConfigError, match="must increase"):
        cascade_members(tiny_encoder("bert"), (2, 2), num_labels=2)
    with pytest.raises(ew.ConfigError, match="do not give layers"):
        cascade_members(tiny_encoder("bert"), (2, None), num_labels=2, layers="all")
    with pytest.raises(ew.CheckpointError, match="not an exitwise model cascade"):
        ModelCascade.from_pretrained(tmp_path)


def test_time_cascade_reports_every_configuration():
    cascade = ModelCascade(members())
    batches = _loader(8)
    out = time_cascade(cascade, cascade.members[-1], batches, {"t0.5": 0.5, "never": 1.0},
                       repeats=2, warmup=0)
    assert set(out) == {"baseline", "t0.5", "never"}
    assert all(len(v["samples_s"]) == 2 and v["median_s"] > 0 for v in out.values())
    assert out["baseline"]["speedup"] == pytest.approx(1.0)
    assert math.isfinite(out["never"]["speedup"])


def test_bfloat16_members_with_a_temperature_decide_live_as_replayed():
    """Live, the first member's bf16 logits were divided by its temperature in bf16; replay
    divides the float32 cache. At thresholds set to the observed confidences (what a
    calibration finds), the rounding moved rows."""
    cascade = ModelCascade([m.to(torch.bfloat16) for m in members()])
    cascade.members[0].temperatures[-1] = 0.7
    loader = _loader(n=32)
    cache = collect_cascade_logits(cascade, loader)
    conf = torch.softmax(cache.logits[:, 0].float() / 0.7, -1).amax(-1)
    for threshold in sorted(set(conf.tolist()))[::2]:
        live = torch.cat([cascade.run(threshold, count_flops=False, **b).member
                          for b in loader])
        assert torch.equal(live, replay_cascade(threshold, cache, cascade).exit_index), threshold

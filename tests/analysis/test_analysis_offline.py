"""Cache persistence, replay on hand-made caches, SDN overthinking numbers, curves and plots."""

from __future__ import annotations

import json

import pytest
import torch

import exitwise as ew
from exitwise.analysis import (
    ExitLogitsCache,
    curves_for_policies,
    exit_histogram,
    overthinking,
    pareto_front,
    per_exit_accuracy,
    plot_curves,
    policy_curve,
    replay,
    save_curves_json,
    static_points,
    summary_table,
)
from exitwise.errors import DataError, InputError


def hand_cache(
    predictions: list[list[int]], labels: list[int], margin: float = 3.0
) -> ExitLogitsCache:
    """2-class cache whose exit k predicts ``predictions[n][k]`` with logit margin ``margin``.
    Exit k costs k + 1 per row; the full model costs the number of exits."""
    preds = torch.tensor(predictions)
    n, e = preds.shape
    logits = torch.zeros(n, e, 2)
    logits.scatter_(2, preds.unsqueeze(2), margin)
    costs = torch.arange(1, e + 1, dtype=torch.float64).expand(n, e).clone()
    return ExitLogitsCache(logits, torch.tensor(labels), costs, torch.full((n,), float(e)),
                           list(range(1, e + 1)))


# Rows x exits (3 exits), all labels 1:
#   r0 right everywhere; r1 right only at exit 0 (destructive); r2 right from exit 1 on;
#   r3 right only at the final; r4 never right; r5 right at exit 1 only (destructive).
OVERTHINK = hand_cache(
    [[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0], [0, 1, 0]], [1, 1, 1, 1, 1, 1]
)


def test_overthinking_matches_hand_computed_values() -> None:
    over = overthinking(OVERTHINK)
    assert over["num_labeled"] == 6
    assert over["final_accuracy"] == pytest.approx(3 / 6)    # r0, r2, r3
    assert over["oracle_accuracy"] == pytest.approx(5 / 6)   # all but r4
    assert over["wasteful"] == pytest.approx(4 / 6)          # r0, r1, r2, r5 right before final
    assert over["destructive"] == pytest.approx(2 / 6)       # r1, r5
    # First exit that is right: exit 0 {r0, r1}, exit 1 {r2, r5}, exit 2 {r3}, none {r4}.
    assert over["earliest_correct"] == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert per_exit_accuracy(OVERTHINK).tolist() == pytest.approx([2 / 6, 3 / 6, 3 / 6])


def test_unknown_labels_are_left_out_of_metrics() -> None:
    cache = OVERTHINK.subset(torch.arange(6))
    cache.labels[4] = -1  # drop the never-right row
    over = overthinking(cache)
    assert over["num_labeled"] == 5 and over["oracle_accuracy"] == pytest.approx(1.0)
    res = replay(ew.get_policy("never"), cache)
    assert res.accuracy == pytest.approx(3 / 5)


def test_replay_static_oracle_and_costs() -> None:
    res = replay(ew.get_policy("static", exit=1), OVERTHINK)
    assert res.exit_index.tolist() == [1] * 6
    assert res.exit_histogram.tolist() == [0, 6, 0]
    assert res.accuracy == pytest.approx(3 / 6)
    assert res.mean_layers == pytest.approx(2.0)
    assert res.flops_speedup == pytest.approx(3 / 2)
    assert res.relative_compute == pytest.approx(2 / 3)

    oracle = replay(ew.get_policy("oracle"), OVERTHINK)
    assert oracle.exit_index.tolist() == [0, 0, 1, 2, 2, 1]
    assert oracle.accuracy == pytest.approx(over := overthinking(OVERTHINK)["oracle_accuracy"])
    assert over == pytest.approx(5 / 6)
    assert oracle.costs.tolist() == [1.0, 1.0, 2.0, 3.0, 3.0, 2.0]
    assert exit_histogram(oracle.exit_index, 3).tolist() == [2, 2, 2]


def test_replay_applies_temperatures_per_exit() -> None:
    # Margin 3 -> confidence 0.9526; a temperature of 2 at exit 0 lowers it to 0.8176.
    policy = ew.get_policy("confidence", threshold=0.9)
    assert replay(policy, OVERTHINK).exit_index.tolist() == [0] * 6
    cooled = replay(policy, OVERTHINK, torch.tensor([2.0, 1.0, 1.0]))
    assert cooled.exit_index.tolist() == [1] * 6
    with pytest.raises(InputError):
        replay(policy, OVERTHINK, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(InputError):
        replay(policy, OVERTHINK, torch.ones(2))


def test_patience_state_is_kept_across_exits() -> None:
    # PABEE with patience 1 leaves once two consecutive exits agree.
    cache = hand_cache([[1, 1, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 1]], [1, 1, 1, 1])
    res = replay(ew.get_policy("patience", patience=1), cache)
    assert res.exit_index.tolist() == [1, 2, 3, 2]


def test_replay_rejects_bad_caches() -> None:
    bad = OVERTHINK.subset(torch.arange(6))
    bad.logits[2, 1, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        replay(ew.get_policy("never"), bad)
    with pytest.raises(InputError, match="empty"):
        replay(ew.get_policy("never"), OVERTHINK.subset(torch.tensor([], dtype=torch.long)))
    unlabeled = OVERTHINK.subset(torch.arange(6))
    unlabeled.labels[0] = -1
    with pytest.raises(InputError, match="label"):
        replay(ew.get_policy("oracle"), unlabeled)
    with pytest.raises(InputError):
        ExitLogitsCache(
            torch.zeros(3, 2, 2), torch.zeros(3), torch.zeros(3, 3), torch.zeros(3), [1, 2]
        )


def test_save_load_round_trips_bit_identically(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    cache = ExitLogitsCache(
        torch.randn(17, 4, 5, generator=g),
        torch.tensor([-1] + list(range(5)) * 3 + [4]),
        torch.rand(17, 4, generator=g, dtype=torch.float64) * 1e9,
        torch.rand(17, generator=g, dtype=torch.float64) * 1e9,
        [2, 4, 6, 8],
        meta={"model": "tiny", "split": "holdout"},
    )
    path = cache.save(tmp_path / "sub" / "cache.safetensors")
    back = ExitLogitsCache.load(path)
    for name in ("logits", "labels", "costs", "full_cost"):
        a, b = getattr(cache, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.exit_layers == [2, 4, 6, 8] and back.meta == cache.meta
    assert b"pickle" not in path.read_bytes()[:200]

    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(DataError):
        ExitLogitsCache.load(other)
    with pytest.raises(DataError):
        ExitLogitsCache.load(tmp_path / "missing.safetensors")


def test_curves_front_json_and_plot(tmp_path) -> None:
    # Exit 0 is right and confident on the first half only; the final exit is always right.
    n = 40
    logits = torch.zeros(n, 2, 2)
    labels = torch.ones(n, dtype=torch.long)
    logits[: n // 2, 0, 1] = 5.0   # confident and right
    logits[n // 2 :, 0, 0] = 0.3   # unsure and wrong
    logits[:, 1, 1] = 2.0
    cache = ExitLogitsCache(logits, labels, torch.tensor([[1.0, 2.0]]).expand(n, 2),
                            torch.full((n,), 2.0), [1, 2])
    points = policy_curve("confidence", cache)
    assert len(points) == len(ew.get_policy("confidence").grid(2))
    by_param = {p["param"]: p for p in points}
    assert by_param[0.5]["accuracy"] == pytest.approx(0.5)      # everyone leaves at exit 0
    assert by_param[0.9]["accuracy"] == pytest.approx(1.0)      # only the easy half leaves
    assert by_param[0.9]["relative_compute"] == pytest.approx(0.75)
    assert by_param[0.9]["flops_speedup"] == pytest.approx(4 / 3)
    assert by_param[1.0]["relative_compute"] == pytest.approx(1.0)

    front = pareto_front(points)
    assert [p["relative_compute"] for p in front] == pytest.approx([0.5, 0.75])
    assert [p["accuracy"] for p in front] == pytest.approx([0.5, 1.0])
    curves = curves_for_policies(["confidence", ew.get_policy("entropy"), "static"], cache)
    assert set(curves) == {"confidence", "entropy", "static"}
    static = static_points(cache)
    assert [p["accuracy"] for p in static] == pytest.approx([0.5, 1.0])

    json_path = save_curves_json(curves, tmp_path / "curves.json", static=static)
    data = json.loads(json_path.read_text())
    assert data["curves"]["static"][1]["accuracy"] == pytest.approx(1.0)

    png = plot_curves(curves, tmp_path / "plot.png", full_accuracy=1.0, static=static, title="t")
    blob = png.read_bytes()
    assert len(blob) > 1000 and blob[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_table_mentions_every_exit_and_policy() -> None:
    text = summary_table(OVERTHINK, {"oracle": replay(ew.get_policy("oracle"), OVERTHINK)})
    assert "oracle accuracy       83.33%" in text
    assert "destructive           33.33%" in text
    lines = text.splitlines()
    assert any(line.split()[:2] == ["2", "3"] for line in lines)  # exit 2 at layer 3
    policy_line = [line for line in lines if line.startswith("oracle ") and line.endswith("x")]
    assert len(policy_line) == 1 and "83.33%" in policy_line[0]

"""The ELUE score (``protocols/elue.py``): mean over the method's points of the performance
minus the baseline curve interpolated at the same FLOPs, against values worked out by hand
(linear and log-FLOPs interpolation, a point beyond the baseline's range extrapolated or
clamped), the per-task mean, and clear errors for bad input."""

from __future__ import annotations

import math

import pytest

import exitwise as ew
from exitwise.protocols import baseline_performance, elue_benchmark, elue_score

BASELINE = [(1.0, 50.0), (2.0, 60.0), (4.0, 70.0)]
# 1.5 FLOPs: halfway on the first segment -> 55; 3: halfway on the second -> 65;
# 5: beyond the last point (4 FLOPs).
POINTS = [(1.5, 58.0), (3.0, 66.0), (5.0, 75.0)]


def test_score_by_hand_with_a_point_beyond_the_baseline():
    # extrapolated: the last segment's slope is 10 / 2 = 5 per FLOP -> p_base(5) = 75
    assert elue_score(POINTS, BASELINE) == pytest.approx(((58 - 55) + (66 - 65) + (75 - 75)) / 3)
    # clamped: p_base(5) = 70, the baseline's last point
    assert elue_score(POINTS, BASELINE, outside="clamp") == pytest.approx(
        ((58 - 55) + (66 - 65) + (75 - 70)) / 3)
    # below the range: the first segment extended (slope 10 per FLOP) -> p_base(0.5) = 45
    assert baseline_performance(BASELINE, 0.5) == pytest.approx(45.0)
    assert baseline_performance(BASELINE, 0.5, outside="clamp") == pytest.approx(50.0)
    # on a baseline point the curve is that point; order of the method's points is free
    assert baseline_performance(BASELINE, 2.0) == pytest.approx(60.0)
    assert elue_score(POINTS[::-1], BASELINE) == pytest.approx(elue_score(POINTS, BASELINE))


def test_log_flops_interpolation_by_hand():
    ln = math.log

    def on(f, x0, y0, x1, y1):  # linear in log FLOPs between (x0, y0) and (x1, y1)
        return y0 + (ln(f) - ln(x0)) / (ln(x1) - ln(x0)) * (y1 - y0)

    want = ((58 - on(1.5, 1, 50, 2, 60)) + (66 - on(3, 2, 60, 4, 70))
            + (75 - on(5, 2, 60, 4, 70))) / 3
    assert elue_score(POINTS, BASELINE, log_flops=True) == pytest.approx(want)
    assert not math.isclose(want, elue_score(POINTS, BASELINE))


def test_benchmark_score_is_the_mean_over_tasks():
    other = [(2.0, 59.0)]  # 1 below the curve
    report = elue_benchmark({"sst-2": (POINTS, BASELINE), "mrpc": (other, BASELINE)})
    assert report["tasks"] == {"sst-2": pytest.approx(4 / 3), "mrpc": pytest.approx(-1.0)}
    assert report["score"] == pytest.approx((4 / 3 - 1.0) / 2)
    assert report["protocol"] == "elue" and report["outside"] == "extrapolate"


@pytest.mark.parametrize(
    "points,baseline,match",
    [
        ([], BASELINE, "empty"),
        (POINTS, [], "empty"),
        (POINTS, [(1.0, 50.0)], "at least two"),
        (POINTS, [(2.0, 60.0), (1.0, 50.0)], "strictly increasing"),
        (POINTS, [(1.0, 50.0), (1.0, 55.0)], "strictly increasing"),
        ([(1.5, float("nan"))], BASELINE, "not finite"),
        (POINTS, [(1.0, 50.0), (float("inf"), 60.0)], "not finite"),
        ([(0.0, 50.0)], BASELINE, "FLOPs must be > 0"),
        ([(1.5,)], BASELINE, "pairs"),
    ],
)
def test_bad_input_is_a_clear_error(points, baseline, match):
    with pytest.raises(ew.InputError, match=match):
        elue_score(points, baseline)


def test_bad_options_and_refused_outside_points():
    with pytest.raises(ew.ConfigError, match="outside"):
        elue_score(POINTS, BASELINE, outside="nearest")
    with pytest.raises(ew.InputError, match="outside the baseline's range"):
        elue_score(POINTS, BASELINE, outside="error")
    assert elue_score(POINTS[:2], BASELINE, outside="error") == pytest.approx(2.0)
    with pytest.raises(ew.InputError, match="task 'mrpc'"):
        elue_benchmark({"mrpc": ([], BASELINE)})
    with pytest.raises(ew.InputError, match="no tasks"):
        elue_benchmark({})

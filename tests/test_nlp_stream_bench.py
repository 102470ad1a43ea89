"""The pure helpers of the UEE-UCB domain-shift benchmark (``benchmarks/nlp_stream.py``),
each against values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from benchmarks.nlp_stream import (
    claim_verdict,
    dominance_violations,
    fixed_exit_scores,
    per_sample_regret,
    pick_best,
    read_mr,
    tail_arm,
)

from exitwise.errors import DataError


def test_read_mr_labels_positive_one_negative_zero_and_skips_blank_lines(tmp_path):
    (tmp_path / "rt-polarity.pos").write_text("a fine film . \n\ngreat fun\n")
    (tmp_path / "rt-polarity.neg").write_text("dull\n")
    ex = read_mr(tmp_path)
    assert ex.texts == ["a fine film .", "great fun", "dull"]
    assert ex.labels == [1, 1, 0]


def test_read_mr_missing_file_is_a_data_error_naming_it(tmp_path):
    (tmp_path / "rt-polarity.pos").write_text("good\n")
    with pytest.raises(DataError, match="rt-polarity.neg"):
        read_mr(tmp_path)


def test_fixed_exit_scores_by_hand():
    preds = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
    labels = torch.tensor([1, 0, 1, 1])
    got = fixed_exit_scores(preds, labels, [0.1, 0.2, 0.3])
    assert got["accuracy"] == pytest.approx([0.25, 0.75, 1.0])
    assert got["disagreement"] == pytest.approx([0.0, 0.5, 0.75])
    # disagreement + c_0 - c_j, and (1 - accuracy) + c_j
    assert got["reward"] == pytest.approx([0.0, 0.4, 0.55])
    assert got["objective"] == pytest.approx([0.85, 0.45, 0.3])


def test_dominance_violations_counts_rows_right_early_then_wrong_later():
    correct = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert dominance_violations(correct) == pytest.approx(0.5)  # rows 0 and 2
    assert dominance_violations(torch.ones(3, 1, dtype=torch.bool)) == 0.0


def test_tail_arm_reads_only_the_last_fifth_ties_to_the_shallowest():
    assert tail_arm([5] * 8 + [0, 0]) == 0
    assert tail_arm([0] * 8 + [2, 1]) == 1
    assert tail_arm([3, 4]) == 4  # a short stream still has a tail of one step


def test_per_sample_regret_is_the_references_cumulative_regret_over_n():
    # objective (lower is better): exit 2 is best; (0.55 + 0.15 + 0 + 0) / 4
    assert per_sample_regret([0, 1, 2, 2], [0.85, 0.45, 0.3]) == pytest.approx(0.175)


def _row(mu: float, acc: float, flops: float, regret: float = 0.0) -> dict:
    return {"mu": mu, "accuracy_mean": acc, "flops_ratio_mean": flops, "regret_mean": regret,
            "tail_regret_mean": regret / 2}


def test_pick_best_is_the_cheapest_within_one_point_else_the_most_accurate():
    rows = [_row(0.0, 0.805, 0.9), _row(0.1, 0.795, 0.6), _row(1.0, 0.78, 0.3)]
    assert pick_best(rows, final_accuracy=0.80)["mu"] == 0.1
    assert pick_best(rows, final_accuracy=0.90)["mu"] == 0.0


def test_claim_needs_every_mu_within_the_tolerance():
    rows = [_row(0.01, 0.8, 1.0, regret=0.005), _row(0.1, 0.8, 0.8, regret=0.02)]
    verdict = claim_verdict(rows, tol=0.01)
    assert verdict["held"] is False
    assert verdict["worst"] == {"mu": 0.1, "regret": 0.02}
    assert verdict["regret_per_mu"] == {"0.01": 0.005, "0.1": 0.02}
    assert claim_verdict(rows, tol=0.03)["held"] is True

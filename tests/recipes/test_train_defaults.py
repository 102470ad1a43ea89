"""The training defaults that adapt to the size of the user's file."""

from __future__ import annotations

from exitwise.recipes.text_classification import default_epochs, default_holdout


def test_default_holdout_is_2000_rows_or_a_quarter_of_a_smaller_file():
    assert default_holdout(67349) == 2000  # SST-2's train file
    assert default_holdout(8000) == 2000
    assert default_holdout(4249) == 1062  # STS-B's train copy: 4249 // 4
    assert default_holdout(1200) == 300


def test_default_epochs_reach_about_300_steps_within_three_epochs():
    assert default_epochs(65349, 32) == 1  # SST-2 less the held-out rows: 2043 steps
    assert default_epochs(8000, 32) == 2  # 250 steps per epoch
    assert default_epochs(9600, 32) == 1  # 300 steps
    assert default_epochs(3187, 32) == 3  # 100 steps per epoch -> 300
    assert default_epochs(5200, 32) == 2  # 163 steps per epoch -> 326
    assert default_epochs(500, 32) == 3  # capped: 16 steps per epoch
    assert default_epochs(1, 32) == 3

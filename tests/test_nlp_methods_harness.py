"""The NLP arena harness (``benchmarks/nlp_methods.py``): a recipe that reuses another's
training (E2CM's unsupervised variant) names a recipe of the same model, and the copy of a
trained model leaves the source's calibration, caches and timings behind."""

from __future__ import annotations

import json

import pytest
from benchmarks.nlp_methods import (
    RECIPES,
    check_work_options,
    copy_trained,
    timing_is_current,
    timing_options,
)

from exitwise.recipes import text_classification as tc


def test_reusing_recipes_train_the_same_model():
    reusing = {n: r for n, r in RECIPES.items() if r.reuse is not None}
    assert reusing, "e2cm_unsup reuses e2cm's training"
    for name, r in reusing.items():
        src = RECIPES[r.reuse]
        assert src.reuse is None  # one level: the source trains
        assert (r.strategy, r.options, r.head, r.tasks) == (src.strategy, src.options, src.head,
                                                            src.tasks), name


def test_copy_trained_keeps_the_model_and_drops_the_runs_results(tmp_path):
    src = tmp_path / "e2cm"
    (src / "backbone").mkdir(parents=True)
    (src / "backbone" / "model.safetensors").write_bytes(b"weights")
    (src / "checkpoints").mkdir()
    (src / "exit_heads.safetensors").write_bytes(b"heads")
    (src / tc.JOB_FILE).write_text(json.dumps({"out_dir": str(src), "strategy": "joint"}))
    for name in ("train.json", "calibration.json", "evaluation.json", "timing.json",
                 "cache-test.safetensors"):
        (src / name).write_text("{}")
    out = tmp_path / "e2cm_unsup"
    copy_trained(src, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["backbone", "exit_heads.safetensors", tc.JOB_FILE])
    assert (out / "backbone" / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((out / tc.JOB_FILE).read_text()) == {"out_dir": str(out),
                                                           "strategy": "joint"}


def test_parts_made_with_other_options_are_not_reused(tmp_path):
    # a rerun with other training rows, learning rate ... reported the old parts' numbers
    # under the new options; timings were kept whatever the threads or repeats
    from argparse import Namespace

    args = Namespace(train_rows=600, holdout=100, stsb_holdout=100, epochs=1.0, lr=5e-3,
                     threads=2, repeats=3, bs1_rows=400, bs32_rows=1024)
    check_work_options(args, tmp_path / "sst2")
    check_work_options(args, tmp_path / "sst2")  # the same options: fine
    with pytest.raises(SystemExit, match=r"lr: 0.005 -> 1e-05"):
        check_work_options(Namespace(**{**vars(args), "lr": 1e-5}), tmp_path / "sst2")
    done = tmp_path / "timing.json"
    done.write_text(json.dumps({"settings": {}, "options": timing_options(args)}))
    assert timing_is_current(args, done)
    assert not timing_is_current(Namespace(**{**vars(args), "threads": 1}), done)
    done.write_text(json.dumps({"settings": {}}))  # written before options were recorded
    assert not timing_is_current(args, done)

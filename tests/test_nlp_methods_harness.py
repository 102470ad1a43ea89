"""The NLP arena harness (``benchmarks/nlp_methods.py``): a recipe that reuses another's
training (E2CM's unsupervised variant) names a recipe of the same model, and the copy of a
trained model leaves the source's calibration, caches and timings behind."""

from __future__ import annotations

import json

from benchmarks.nlp_methods import RECIPES, copy_trained

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

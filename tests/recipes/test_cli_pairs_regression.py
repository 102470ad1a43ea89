"""A new user's first real tasks through the CLI with default options: a sentence-pair task
with string labels, and a regression task (tiny local model, tiny files, no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_cli_flow import WORDS

from exitwise.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 3-layer random BERT saved without a pooler (as an encoder checkpoint whose pooler
    was never trained), with a word-level tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert-no-pooler")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


def pair_files(root: Path, regression: bool = False) -> Path:
    """sentence1/sentence2 TSVs. Classification: 'entailment' iff the second sentence holds a
    positive word (string labels). Regression: the score is 1.5 x the number of positive words
    in the second sentence (decimal numbers)."""
    rng = random.Random(1)
    d = root / ("sts" if regression else "nli")
    d.mkdir()
    for split, n in (("train", 420), ("dev", 60)):
        lines = ["index\tsentence1\tsentence2\t" + ("score" if regression else "label")]
        for i in range(n):
            first = " ".join(rng.choice(WORDS[6:]) for _ in range(4))
            k = rng.randint(0, 2) if regression else rng.randint(0, 1)
            cues = [rng.choice(WORDS[:3]) for _ in range(k)] or [rng.choice(WORDS[3:6])]
            second = " ".join(cues + [rng.choice(WORDS[6:]) for _ in range(3)])
            label = f"{1.5 * k:.3f}" if regression else (
                "entailment" if k else "contradiction")
            lines.append(f"{i}\t{first}\t{second}\t{label}")
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return d


def test_pair_task_with_string_labels_default_options(tiny_model_dir, tmp_path, capsys):
    data = pair_files(tmp_path)
    out = tmp_path / "nli"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data", str(data),
                 "--epochs", "3", "--lr", "1e-3", "--holdout", "120", "--batch-size", "16"]) == 0
    said = capsys.readouterr().out
    # both columns were read and said so, string labels mapped and kept
    assert "sentence pairs" in said and "text_pair='sentence2'" in said
    assert "2 classes (contradiction, entailment)" in said
    assert "exit head: mean (the checkpoint has no trained pooler" in said
    cfg = json.loads((out / "exit_config.json").read_text())["exit_config"]
    assert cfg["label_names"] == ["contradiction", "entailment"]
    report = json.loads((out / "train_report.json").read_text())
    assert report["dead_exits"] == [], report  # live exits by default

    # certified by default: a 10-point target needs >= 29 held-out rows at delta 0.1
    assert main(["calibrate", str(out), "--max-drop", "10"]) == 0
    table = capsys.readouterr().out
    assert "certified drop (pts, delta=0.1)" in table and "entropy@drop10" in table
    calib = json.loads((out / "exit_config.json").read_text())["calibration"]["policies"]
    for entry in calib.values():
        held = entry["heldout"]
        if held["met_target"]:
            assert held["certified_bound_points"] <= 10.0 and held["delta"] == 0.1

    assert main(["evaluate", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "accuracy %" in shown and "entropy@drop10" in shown and "exit layer" in shown
    assert main(["bench", str(out), "--batch-sizes", "1", "--repeats", "1", "--limit", "8"]) == 0
    shown = capsys.readouterr().out
    assert "measured, batch 1" in shown and "report:" in shown
    assert json.loads((out / "bench-dev.json").read_text())["batch_sizes"]["1"]["policies"]


def test_too_small_a_held_out_slice_is_refused_honestly(tiny_model_dir, tmp_path, capsys):
    data = pair_files(tmp_path)
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data", str(data),
                 "--max-steps", "2", "--holdout", "40"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(out), "--max-drop", "1"]) == 2
    err = capsys.readouterr().err
    assert "too few to certify" in err and "Hold out at least 299 rows" in err
    assert main(["calibrate", str(out), "--max-drop", "1", "--delta", "none"]) == 0


def test_regression_task_end_to_end(tiny_model_dir, tmp_path, capsys):
    data = pair_files(tmp_path, regression=True)
    out = tmp_path / "sts"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data", str(data),
                 "--epochs", "3", "--lr", "1e-3", "--holdout", "120", "--batch-size", "16"]) == 0
    said = capsys.readouterr().out
    assert "regression targets 0.00..3.00" in said and "pearson" in said
    assert json.loads((out / "exit_config.json").read_text())["exit_config"]["num_labels"] == 1
    assert main(["calibrate", str(out), "--max-drop", "5"]) == 0
    shown = capsys.readouterr().out
    assert "patience@drop5" in shown and "no certificate" in shown
    # PABEE's regression tolerance follows the targets' spread (0.1 was in STS-B's units)
    from exitwise.policies.patience import tolerance_for_targets
    from exitwise.recipes.text_classification import split_train
    from exitwise.recipes.train_job import load_job

    held = split_train(load_job(out))[1]
    stored = json.loads((out / "exit_config.json").read_text())["calibration"]
    tolerance = stored["policies"]["patience@drop5"]["policy"]["tolerance"]
    assert tolerance == pytest.approx(tolerance_for_targets(held.labels))
    assert f"tolerance {tolerance:.4g}" in shown
    assert "entropy" not in shown  # classification criteria are not offered
    assert main(["evaluate", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == "pearson" and report["full"]["pearson"] > 0.5
    assert set(report["full"]) == {"pearson", "spearman", "mse"}
    assert main(["bench", str(out), "--batch-sizes", "1", "--repeats", "1", "--limit", "8"]) == 0
    assert "pearson x100" in capsys.readouterr().out
    # a classification-only criterion on a regression model says what to use instead
    assert main(["calibrate", str(out), "--max-drop", "5", "--policies", "entropy"]) == 2
    assert "use one of" in capsys.readouterr().err


def test_a_classification_recipe_refuses_a_regression_model():
    from conftest import tiny_encoder

    import exitwise as ew
    from exitwise.errors import ConfigError
    from exitwise.training import train

    model = ew.attach_exits(tiny_encoder("bert"), num_labels=1, head="mean")
    with pytest.raises(ConfigError, match="regression model"):
        train(model, [{"input_ids": [1, 2], "labels": 0.5}], strategy="self_distill",
              output_dir="unused")


def test_training_on_another_split_and_evaluating_elsewhere(tiny_model_dir, tmp_path, capsys):
    """A folder with only dev and test (as ../shared/data/snli): train on dev with --split,
    evaluate defaults to test, and evaluating on the split trained on is refused."""
    data = pair_files(tmp_path)
    (data / "train.tsv").rename(data / "test.tsv")  # now: dev.tsv (60 rows) and test.tsv
    (data / "dev.tsv").rename(data / "keep.tsv")
    (data / "test.tsv").rename(data / "dev.tsv")  # dev: the 420-row file
    (data / "keep.tsv").rename(data / "test.tsv")  # test: the 60-row file
    out = tmp_path / "on-dev"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data", str(data),
                 "--split", "dev", "--max-steps", "2", "--holdout", "100"]) == 0
    said = capsys.readouterr().out
    assert "dev.tsv: 420 sentence pairs" in said, said  # the dev file was the one read
    assert json.loads((out / "exitwise_job.json").read_text())["train_split"] == "dev"
    assert main(["evaluate", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "test" and report["rows"] == 60
    assert main(["evaluate", str(out), "--split", "dev"]) == 2
    assert "trained on split 'dev'" in capsys.readouterr().err

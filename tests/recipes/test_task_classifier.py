"""`exitwise train` on a ``*ForSequenceClassification`` checkpoint: its classifier stays the
final exit exactly when the data's labels mean its outputs (it was always dropped before)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from exitwise.cli import main
from exitwise.data.text import TextExamples
from exitwise.recipes.sources import task_classifier

WORDS = ["good", "great", "bad", "awful", "the", "film", "a", "is"]


def _checkpoint(d: Path, num_labels: int, id2label: dict[int, str] | None = None) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                     num_labels=num_labels)
    if id2label:
        cfg.id2label = dict(id2label)
        cfg.label2id = {v: k for k, v in id2label.items()}
    BertForSequenceClassification(cfg).save_pretrained(d)
    return d


def _examples(labels, names=None, task="classification") -> TextExamples:
    return TextExamples(["a"] * len(labels), list(labels), "mem", label_names=names, task=task)


def test_the_plan_keeps_the_classifier_only_where_the_labels_mean_its_outputs(tmp_path):
    named = _checkpoint(tmp_path / "named", 2, {0: "pos", 1: "neg"})
    plain = _checkpoint(tmp_path / "plain", 3)
    reg = _checkpoint(tmp_path / "reg", 1)

    same = task_classifier(str(named), _examples([0, 1], ["neg", "pos"]))
    assert same.keep and same.label_names == ["pos", "neg"]  # the checkpoint's order
    assert "0=pos, 1=neg" in same.note and "kept" in same.note
    other = task_classifier(str(named), _examples([0, 1], ["cat", "dog"]))
    assert not other.keep and "fresh head" in other.note and "['cat', 'dog']" in other.note
    ids = task_classifier(str(named), _examples([0, 1, 1]))
    assert ids.keep and ids.num_labels == 2 and ids.label_names == ["pos", "neg"]
    assert task_classifier(str(plain), _examples([0, 2])).keep  # ids below its 3 classes
    too_many = task_classifier(str(plain), _examples([0, 3]))
    assert not too_many.keep and "class id 3" in too_many.note
    assert not task_classifier(str(plain), _examples([0, 1], ["a", "b"])).keep  # no names
    assert task_classifier(str(reg), _examples([0.5, 1.5], task="regression")).keep
    assert not task_classifier(str(named), _examples([0.5], task="regression")).keep
    assert not task_classifier(str(reg), _examples([0, 1])).keep

    # numeric names (a star rating) on the ids route: ids stay ids, the names are dropped
    stars = _checkpoint(tmp_path / "stars", 5, {i: str(i + 1) for i in range(5)})
    by_id = task_classifier(str(stars), _examples([0, 1, 4]))
    assert by_id.keep and by_id.label_names is None
    # data names among the checkpoint's: kept, in its order
    sub = task_classifier(str(named), _examples([0], ["neg"]))
    assert sub.keep and sub.label_names == ["pos", "neg"]
    cased = task_classifier(str(named), _examples([0, 1], ["NEG", "POS"]))
    assert not cased.keep and "differ in case only" in cased.note
    # a multi-label (sigmoid) classifier is not a softmax over classes
    multi = _checkpoint(tmp_path / "multi", 2, {0: "pos", 1: "neg"})
    cfg = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**cfg,
                                                   "problem_type": "multi_label_classification"}))
    assert not task_classifier(str(multi), _examples([0, 1], ["neg", "pos"])).keep

    from transformers import BertConfig, BertModel

    bare = tmp_path / "bare"
    BertModel(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(bare)
    assert task_classifier(str(bare), _examples([0, 1])) is None
    assert task_classifier(str(tmp_path / "nowhere"), _examples([0, 1])) is None


@pytest.fixture
def named_data(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 80), ("dev", 20)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.choice(["neg", "pos"])
            cue = rng.choice(WORDS[:2] if label == "pos" else WORDS[2:4])
            lines.append(f"the film is {cue}\t{label}")
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return d


def test_train_keeps_the_classifier_and_its_class_order(tmp_path, named_data, capsys):
    from safetensors.torch import load_file

    ckpt = _checkpoint(tmp_path / "ckpt", 2, {0: "pos", 1: "neg"})
    before = load_file(str(ckpt / "model.safetensors"))["classifier.weight"]
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(ckpt), "--data", str(named_data),
                 "--max-steps", "2", "--batch-size", "16", "--lr", "1e-6",
                 "--holdout", "20"]) == 0
    assert "classifier (2 classes: 0=pos, 1=neg) is kept" in capsys.readouterr().out
    meta = json.loads((out / "exit_config.json").read_text())
    assert meta["exit_config"]["final_head"] == "native"
    assert meta["exit_config"]["label_names"] == ["pos", "neg"]
    saved = load_file(str(next((out / "backbone").glob("*.safetensors"))))
    # the trained classifier, barely moved at this rate (a fresh one would be another draw)
    assert torch.allclose(saved["classifier.weight"], before, atol=1e-3)
    # later commands read the dev labels in the checkpoint's order
    assert main(["evaluate", str(out), "--split", "dev", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 20


def test_train_replaces_a_classifier_of_other_classes(tmp_path, named_data, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt", 2, {0: "cat", 1: "dog"})
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(ckpt), "--data", str(named_data),
                 "--max-steps", "2", "--batch-size", "16", "--holdout", "20"]) == 0
    assert "is not used: its classes are not the data's" in capsys.readouterr().out
    meta = json.loads((out / "exit_config.json").read_text())
    assert meta["exit_config"]["final_head"] != "native"
    assert meta["exit_config"]["label_names"] == ["neg", "pos"]


def test_star_ratings_given_as_ids_keep_their_classes(tmp_path, capsys):
    # a checkpoint named "1".."5" and a file of ids 0..4: the ids were re-read as names, so
    # id 1 became class 0 (two classes merged, one lost), in train and later commands alike
    from safetensors.torch import load_file

    d = tmp_path / "data"
    d.mkdir()
    rng = random.Random(1)
    for split, n in (("train", 60), ("dev", 20)):
        rows = ["sentence\tlabel"] + [
            f"the film is {rng.choice(WORDS)}\t{rng.randint(0, 4)}" for _ in range(n)]
        (d / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    ckpt = _checkpoint(tmp_path / "stars", 5, {i: str(i + 1) for i in range(5)})
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(ckpt), "--data", str(d),
                 "--max-steps", "1", "--batch-size", "16", "--holdout", "20"]) == 0
    assert "class ids are read as its ids" in capsys.readouterr().out
    meta = json.loads((out / "exit_config.json").read_text())
    assert meta["exit_config"]["final_head"] == "native"
    assert meta["exit_config"]["label_names"] is None and meta["exit_config"]["num_labels"] == 5
    assert load_file(str(out / "exit_heads.safetensors"))  # saved whole
    from exitwise.recipes.text_classification import load_trained
    from exitwise.recipes.text_evaluate import eval_examples

    model, _ = load_trained(out)
    examples, _, _ = eval_examples(model, out, None, "dev", None)
    raw = [int(line.rsplit("\t", 1)[1]) for line in
           (d / "dev.tsv").read_text().splitlines()[1:]]
    assert examples.labels == raw  # ids as written


def test_the_native_head_is_for_the_final_exit_only(tmp_path, named_data, capsys):
    # --head native gave every exit the one classifier: trained, then failed to save
    ckpt = _checkpoint(tmp_path / "ckpt", 2, {0: "pos", 1: "neg"})
    assert main(["train", "--out", str(tmp_path / "m"), "--model", str(ckpt), "--data",
                 str(named_data), "--head", "native", "--max-steps", "1",
                 "--holdout", "20"]) == 2
    assert "only the final exit can be" in capsys.readouterr().err


def test_past_future_on_a_classifier_checkpoint_from_the_command_line(tmp_path, named_data,
                                                                      capsys):
    # the error asked for final_head='past_future', which the command line could not give
    ckpt = _checkpoint(tmp_path / "ckpt", 2, {0: "pos", 1: "neg"})
    common = ["--model", str(ckpt), "--data", str(named_data), "--max-steps", "1",
              "--holdout", "20", "--strategy", "past_future", "--head", "past_future"]
    assert main(["train", "--out", str(tmp_path / "a"), *common]) == 2
    assert "--final-head past_future" in capsys.readouterr().err
    assert not (tmp_path / "a" / "exit_config.json").exists()
    assert main(["train", "--out", str(tmp_path / "b"), *common,
                 "--final-head", "past_future"]) == 0
    meta = json.loads((tmp_path / "b" / "exit_config.json").read_text())
    assert meta["exit_config"]["final_head"] == "past_future"
    assert json.loads((tmp_path / "b" / "exitwise_job.json").read_text())["final_head"] == (
        "past_future")

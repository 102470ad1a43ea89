"""Reading text-classification tables: both column orders, folders of splits, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from exitwise.data import load_examples, read_table, train_holdout_split
from exitwise.errors import DataError

SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_label_first_and_sentence_first(tmp_path):
    a = read_table(write(tmp_path / "a.tsv", "label\tsentence\n0\tbad film\n1\tgreat film\n"))
    b = read_table(write(tmp_path / "b.tsv", "sentence\tlabel\nbad film\t0\ngreat film\t1\n"))
    for ex in (a, b):
        assert ex.texts == ["bad film", "great film"] and ex.labels == [0, 1]
        assert len(ex) == 2 and ex.num_labels == 2
    assert a.source.endswith("a.tsv")


def test_header_names_are_case_insensitive_and_extra_columns_ok(tmp_path):
    ex = read_table(write(tmp_path / "x.tsv", "id\tText\tLabel\n7\thello\t2\n8\tbye\t0\n"))
    assert ex.texts == ["hello", "bye"] and ex.labels == [2, 0] and ex.num_labels == 3


def test_quotes_in_tsv_are_plain_text(tmp_path):
    ex = read_table(write(tmp_path / "q.tsv", 'label\tsentence\n1\tit \'s a "must" see\n'))
    assert ex.texts == ['it \'s a "must" see']


def test_csv_with_quoted_commas(tmp_path):
    ex = read_table(write(tmp_path / "c.csv", 'text,label\n"slow, dull, long",0\nfine,1\n'))
    assert ex.texts == ["slow, dull, long", "fine"] and ex.labels == [0, 1]


def test_blank_lines_are_skipped(tmp_path):
    ex = read_table(write(tmp_path / "b.tsv", "label\tsentence\n1\tok\n\n0\tno\n"))
    assert ex.labels == [1, 0]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "missing_dir"))


@pytest.mark.parametrize(
    "content, line, match",
    [
        ("label\tsentence\n1\tok\n0\ttoo\tmany\n", 3, "expected 2 tab-separated fields, got 3"),
        ("label\tsentence\n1\tok\n0\n", 3, "got 1"),
        ("label\tsentence\n1\tok\n1\tfine\npos\tgood\n", 4, "mix numbers and names"),
    ],
    ids=["too-many-fields", "too-few-fields", "non-integer-label"],
)
def test_malformed_rows_name_file_and_line(tmp_path, content, line, match):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(DataError, match=match) as err:
        read_table(path)
    assert f"{path}:{line}:" in str(err.value)


@pytest.mark.parametrize(
    "content, match",
    [
        ("sentence\tvalue\nok\t1\n", "label column"),
        ("idx\tlabel\n1\t0\n", "text column"),
        ("", "empty"),
        ("label\tsentence\n", "no rows"),
    ],
)
def test_bad_headers_and_empty_files(tmp_path, content, match):
    path = write(tmp_path / "h.tsv", content)
    with pytest.raises(DataError, match=match) as err:
        read_table(path)
    assert str(path) in str(err.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.tsv"
    path.write_bytes("label\tsentence\n1\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_table(path)


def test_folder_of_splits(tmp_path):
    write(tmp_path / "train.tsv", "label\tsentence\n0\ta\n1\tb\n1\tc\n")
    write(tmp_path / "dev.tsv", "sentence\tlabel\nd\t0\n")
    assert load_examples(tmp_path, "train").texts == ["a", "b", "c"]
    assert load_examples(tmp_path, "dev").texts == ["d"]
    assert load_examples(str(tmp_path), "validation").texts == ["d"]
    with pytest.raises(DataError, match="no file for split 'test'"):
        load_examples(tmp_path, "test")


def test_holdout_split(tmp_path):
    rows = "".join(f"{i % 2}\ts{i}\n" for i in range(10))
    write(tmp_path / "train.tsv", "label\tsentence\n" + rows)
    ex = load_examples(tmp_path, "train")
    rest, held = train_holdout_split(ex, 0.3, seed=1)
    assert len(rest) == 7 and len(held) == 3
    assert sorted(rest.texts + held.texts) == sorted(ex.texts)
    assert train_holdout_split(ex, 3, seed=1)[1].texts == held.texts  # same seed, same split
    with pytest.raises(DataError):
        train_holdout_split(ex, 10)


@pytest.mark.skipif(not SST2.is_dir(), reason="shared SST-2 copy not present")
def test_shared_sst2_sizes():
    train, dev = load_examples(SST2, "train"), load_examples(SST2, "dev")
    assert (len(train), len(dev)) == (67349, 872)
    assert sum(train.labels) == 37569 and sum(dev.labels) == 444
    assert train.num_labels == dev.num_labels == 2


def test_tokenize_and_collate_into_model_batches(tmp_path):
    import torch
    import transformers as tf
    from conftest import tiny_encoder

    import exitwise as ew
    from exitwise.data import TextExamples, TokenizedDataset, make_collator

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very"]
    tokenizer = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    examples = TextExamples(["good film", "very very bad film", "bad"], [1, 0, 0])
    dataset = TokenizedDataset(examples, tokenizer, max_length=5)
    assert len(dataset) == 3 and dataset[1]["labels"] == 0
    assert len(dataset[1]["input_ids"]) == 5  # truncated to max_length
    batch = make_collator(tokenizer)([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum(1).tolist() == [4, 5, 3]
    assert batch["labels"].tolist() == [1, 0, 0]
    model = ew.attach_exits(tiny_encoder("bert"), num_labels=2)
    res = model.early_exit(ew.get_policy("never"), **dict(batch))
    assert res.logits.shape == (3, 2)
    torch.testing.assert_close(res.logits, model.full_depth(**dict(batch)), atol=1e-5, rtol=0)
    with pytest.raises(DataError):
        TokenizedDataset(TextExamples([], []), tokenizer)

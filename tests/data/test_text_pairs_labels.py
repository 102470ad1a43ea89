"""Sentence pairs, string labels, regression targets, GLUE headers, parallel files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from exitwise.data import TokenizedDataset, load_examples, read_parallel, read_table
from exitwise.data.tables import parse_labels
from exitwise.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# The header row and one data row of every GLUE task's original TSV files.
GLUE = {
    "mrpc": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him ...", "pair"),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "1\t2\t3\tHow do I cook rice?\tWhat is the way to cook rice?\t1", "pair"),
    "qnli": ("index\tquestion\tsentence\tlabel",
             "0\tWhen did it open?\tIt opened in 1990.\tentailment", "pair"),
    "rte": ("index\tsentence1\tsentence2\tlabel",
            "0\tNo weapons were found.\tWeapons were found.\tnot_entailment", "pair"),
    "wnli": ("index\tsentence1\tsentence2\tlabel", "0\tI stuck a pin.\tI stuck it.\t1", "pair"),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse"
             "\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             "0\t1\t1n\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tA man sleeps.\tA man is awake."
             "\tcontradiction\tcontradiction", "pair"),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
             "\tscore", "0\tmain\tMSRvid\t2012\t1\tnone\tnone\tA plane.\tAn air plane.\t5.000",
             "pair"),
    "sst2": ("sentence\tlabel", "a gorgeous film\t1", "single"),
}


@pytest.mark.parametrize("task", sorted(GLUE))
def test_every_glue_header_is_read_with_all_its_text_columns(tmp_path, task):
    header, row, kind = GLUE[task]
    path = tmp_path / f"{task}.tsv"
    path.write_text(f"{header}\n{row}\n", encoding="utf-8")
    ex = read_table(path)
    fields = row.split("\t")
    names = [h.lower() for h in header.split("\t")]
    assert ex.is_pair == (kind == "pair")
    if kind == "pair":
        # the two texts are the pair columns of the header, never one of them alone
        assert ex.texts[0] in fields and ex.text_pairs[0] in fields
        assert ex.texts[0] != ex.text_pairs[0]
        assert "text_pair=" in ex.columns
    if task == "stsb":
        assert ex.task == "regression" and ex.labels == [5.0] and ex.num_labels == 1
    if task in ("qnli", "rte"):  # string labels -> ids, names kept (id2label)
        assert ex.label_names == [fields[names.index("label")]] and ex.labels == [0]
    if task == "mnli":
        assert ex.label_names == ["contradiction"] and "gold_label" in ex.columns
    assert "label=" in ex.columns


def test_string_labels_map_like_hugging_face_and_keep_their_names(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text("sentence1\tsentence2\tlabel\na\tb\tneutral\nc\td\tentailment\n"
                     "e\tf\tcontradiction\ng\th\tentailment\n")
    ex = read_table(train)
    assert ex.label_names == ["contradiction", "entailment", "neutral"]  # sorted
    assert ex.labels == [2, 1, 0, 1] and ex.num_labels == 3
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence1\tsentence2\tlabel\nx\ty\tneutral\n")
    # the evaluation split maps with the trained model's names, not its own sorted set
    got = read_table(dev, label_names=["contradiction", "entailment", "neutral"])
    assert got.labels == [2] and got.label_names == ["contradiction", "entailment", "neutral"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tlabel\nx\ty\tmaybe\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: label 'maybe' is not one of"):
        read_table(bad, label_names=["contradiction", "entailment", "neutral"])


@pytest.mark.parametrize("raw, labels, names, task", [
    (["0", "2", "1"], [0, 2, 1], None, "classification"),  # numbers stay numbers
    (["3.8", "5", "0.25"], [3.8, 5.0, 0.25], None, "regression"),
    (["1e-1", "2"], [0.1, 2.0], None, "regression"),
    (["pos", "neg", "pos"], [1, 0, 1], ["neg", "pos"], "classification"),
    # -1 / 1 files: named classes in numeric order (a negative id was refused)
    (["1", "-1", "1", "-1"], [1, 0, 1, 0], ["-1", "1"], "classification"),
    (["-1", "10", "2"], [0, 2, 1], ["-1", "2", "10"], "classification"),
])
def test_label_parsing_rules(raw, labels, names, task):
    got = parse_labels(raw)
    assert got == (labels, names, task)


def test_forced_task_and_bad_regression_targets():
    assert parse_labels(["1", "2"], task="regression") == ([1.0, 2.0], None, "regression")
    with pytest.raises(DataError, match="not a number"):
        parse_labels(["1.5", "high"], task="regression", where=["f:2", "f:3"])


def test_headerless_file_needs_columns_and_reads_them(tmp_path):
    path = tmp_path / "cola.tsv"
    path.write_text("gj04\t1\t\tOur friends won't buy this analysis.\n"
                    "gj04\t0\t*\tThey drank the pub.\n")
    with pytest.raises(DataError, match="--columns"):
        read_table(path)
    ex = read_table(path, columns="4,2")
    assert ex.texts == ["Our friends won't buy this analysis.", "They drank the pub."]
    assert ex.labels == [1, 0] and not ex.is_pair and "column 4" in ex.columns
    # positions on a file that has a header: the header row is recognised and skipped
    with_header = tmp_path / "h.tsv"
    with_header.write_text("id\ttext\tlabel\n1\tfine\t1\n")
    assert read_table(with_header, columns="2,3").texts == ["fine"]
    # a header that names the label column otherwise: a name above numeric labels
    custom = tmp_path / "c.csv"
    custom.write_text("id,body,verdict\n1,fine,1\n2,bad,0\n")
    ex = read_table(custom, columns="2,3")
    assert ex.texts == ["fine", "bad"] and ex.labels == [1, 0]
    by_name = read_table(with_header, columns=["text", "label"])
    assert by_name.texts == ["fine"] and by_name.columns.startswith("text='text'")
    for bad, match in (("1", "give the text"), ("0,1", "count from 1"), ("text,2", "not both"),
                       ("9,1", "do not exist")):
        with pytest.raises(DataError, match=match):
            read_table(path, columns=bad)


def test_empty_labels_a_byte_order_mark_and_a_missing_line_are_handled(tmp_path):
    # an empty label is refused with its line (it once became a class ""); Excel's "CSV
    # UTF-8" byte-order mark is not part of the header
    path = tmp_path / "t.tsv"
    path.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\nmeh\t\nok\tpos\n")
    with pytest.raises(DataError, match=r"t\.tsv:4: the label is empty"):
        read_table(path)
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b'\xef\xbb\xbfsentence,label\r\n"good, fun",1\r\nbad film,0\r\n')
    ex = read_table(excel)
    assert ex.texts == ["good, fun", "bad film"] and ex.labels == [1, 0]
    assert read_table(excel, columns="sentence,label").labels == [1, 0]
    # parallel line files: a label line lost in the middle is refused, not shifted
    (tmp_path / "s1.train").write_text("".join(f"film {i}\n" for i in range(5)))
    (tmp_path / "labels.train").write_text("pos\nneg\npos\nneg\n\n")
    with pytest.raises(DataError, match="s1.train has 5 lines"):
        read_parallel(tmp_path, "train")
    (tmp_path / "labels.train").write_text("pos\nneg\npos\nneg\npos\n\n\n")
    assert read_parallel(tmp_path, "train").labels == [1, 0, 1, 0, 1]


def test_parallel_files_as_snli_ships_them(tmp_path):
    (tmp_path / "s1.dev").write_text("A man plays .\nA dog runs .\n")
    (tmp_path / "s2.dev").write_text("Someone plays .\nA cat sleeps .\n")
    (tmp_path / "labels.dev").write_text("entailment\ncontradiction\n\n")
    ex = load_examples(tmp_path, "dev")
    assert ex.texts == ["A man plays .", "A dog runs ."]
    assert ex.text_pairs == ["Someone plays .", "A cat sleeps ."]
    assert ex.label_names == ["contradiction", "entailment"] and ex.labels == [1, 0]
    assert "s2.dev" in ex.columns
    (tmp_path / "s2.test").write_text("only one line\n")
    (tmp_path / "s1.test").write_text("a\nb\n")
    (tmp_path / "labels.test").write_text("entailment\nneutral\n")
    with pytest.raises(DataError, match="s2.test has 1 lines"):
        read_parallel(tmp_path, "test")


@pytest.mark.skipif(not (SHARED / "snli" / "s1.dev").is_file(), reason="../shared/data absent")
def test_the_shared_pair_and_regression_files():
    snli = load_examples(SHARED / "snli", "dev")
    assert len(snli) == 9842 and snli.is_pair and snli.num_labels == 3
    stsb = load_examples(SHARED / "stsb", "dev", columns="8,9,10")
    assert len(stsb) == 1500 and stsb.task == "regression" and stsb.is_pair
    assert 0.0 <= min(stsb.labels) and max(stsb.labels) <= 5.0


def test_pairs_are_tokenized_as_pairs():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    core.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                  cls_token="[CLS]", sep_token="[SEP]",
                                  model_input_names=["input_ids", "token_type_ids",
                                                     "attention_mask"])
    from exitwise.data import TextExamples

    ds = TokenizedDataset(TextExamples(["a b"], [1], text_pairs=["c"]), tok)
    item = ds[0]
    assert item["input_ids"] == [2, 4, 5, 3, 6, 3] and item["labels"] == 1
    assert item["token_type_ids"] == [0, 0, 0, 0, 1, 1]


def test_hugging_face_datasets_with_pairs_classlabels_regression_and_no_gold():
    datasets = pytest.importorskip("datasets")
    from exitwise.data import examples_from_hf

    feats = datasets.Features({
        "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    ds = datasets.Dataset.from_dict(
        {"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "label": [0, -1, 2]},
        features=feats)
    ex = examples_from_hf(ds, "snli")
    assert ex.texts == ["a", "c"] and ex.text_pairs == ["x", "z"] and ex.labels == [0, 2]
    assert ex.label_names == ["entailment", "neutral", "contradiction"]
    assert ex.notes == ["dropped 1 rows without a gold label (-1)"]
    reg = datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "label": [3.2]})
    got = examples_from_hf(reg, "stsb")
    assert got.task == "regression" and math.isclose(got.labels[0], 3.2) and got.is_pair


def test_json_lines_files_read_as_tables(tmp_path):
    # one object per line: its keys are the header, so the usual column names apply;
    # numbers stay numbers (regression), null labels are refused like empty ones
    (tmp_path / "train.jsonl").write_text(
        '{"premise": "A man plays.", "hypothesis": "Someone plays.", "label": "entailment"}\n'
        '\n{"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "label": "contradiction"}\n')
    ex = load_examples(tmp_path, "train")
    assert ex.is_pair and ex.texts == ["A man plays.", "A dog runs."]
    assert ex.label_names == ["contradiction", "entailment"] and ex.labels == [1, 0]
    reg = tmp_path / "r.jsonl"
    reg.write_text('{"text": "fine", "score": 4.5}\n{"text": "bad", "score": 0.25}\n')
    ex = read_table(reg)
    assert ex.task == "regression" and ex.labels == [4.5, 0.25]
    assert read_table(reg, columns="text,score").texts == ["fine", "bad"]
    with pytest.raises(DataError, match="by name"):
        read_table(reg, columns="1,2")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "bad"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: the object has no \['label'\]"):
        read_table(bad)
    bad.write_text('{"text": "fine", "label": 1}\n{"text": "bad", "label": null}\n')
    with pytest.raises(DataError, match="label is empty"):
        read_table(bad)
    bad.write_text('{"text": "fine", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: not a JSON object"):
        read_table(bad)


def test_class_ids_without_rows_are_noted(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("sentence\tlabel\ngood\t2\nbad\t1\nfine\t2\n")
    ex = read_table(path)
    assert ex.labels == [2, 1, 2] and any("class ids [0] have no rows" in n for n in ex.notes)
    assert len(ex.subset([0, 1]).notes) == len(ex.notes)  # not repeated by a subset
    path.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    assert read_table(path).notes == []

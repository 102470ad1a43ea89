"""Text-classification and regression data: tables, parallel files, Hugging Face datasets.

``load_examples(source, split)`` reads

- a TSV/CSV or JSON Lines file (or a folder holding ``train.tsv`` / ``dev.tsv`` /
  ``train.jsonl`` ...), GLUE's original files included, single sentences or pairs
  (:mod:`exitwise.data.tables`);
- a folder of parallel line files, SentEval style: ``s1.<split>``, ``s2.<split>`` (optional)
  and ``labels.<split>``, one example per line (SNLI as shipped in ``../shared/data/snli``);
- a Hugging Face dataset id such as ``glue/sst2``, ``glue/mnli`` or ``stanfordnlp/snli``
  (needs the ``data`` extra and a network or a local cache).

The result says which columns it used (:attr:`TextExamples.columns`) and what the labels are
(class names as ``label_names`` = ``id2label``, or regression targets). Every problem with a
file is raised as a :class:`~exitwise.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import DataError
from .tables import (
    CLASSIFICATION,
    JSON_LINES,
    LABEL_COLUMNS,
    PAIR_COLUMNS,
    REGRESSION,
    TEXT_COLUMNS,
    describe_labels,
    parse_columns_spec,
    parse_labels,
    read_rows,
    resolve_columns,
    split_fields,
)


@dataclass
class TextExamples:
    """Parallel lists: texts, optional second texts of pairs, labels.

    labels: class ids (int) or regression targets (float); -1 / nan when unknown.
    label_names: class names by id (``id2label``) when the labels were names, else None.
    task: "classification" or "regression".
    columns: which columns of the source were read (for the user to check).
    """

    texts: list[str]
    labels: list[Any]
    source: str = ""
    text_pairs: list[str] | None = None
    label_names: list[str] | None = None
    task: str = CLASSIFICATION
    columns: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts):
            raise DataError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise DataError(f"{len(self.texts)} texts but {len(self.text_pairs)} second texts")
        if self.task == CLASSIFICATION and self.labels and not self.label_names:
            # ids are classes 0..max: ids counted from 1 leave a class no row can teach
            unused = sorted(set(range(max(self.labels) + 1)) - set(self.labels))
            note = (f"class ids {unused[:10]}{'...' if len(unused) > 10 else ''} have no rows "
                    f"(the classes are 0..{max(self.labels)}); ids counted from 1 make an "
                    "extra class 0: relabel the file from 0")
            if unused and note not in self.notes:
                self.notes.append(note)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_pair(self) -> bool:
        return self.text_pairs is not None

    def subset(self, indices: Sequence[int]) -> "TextExamples":
        idx = list(indices)
        return TextExamples(
            [self.texts[i] for i in idx], [self.labels[i] for i in idx], self.source,
            None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            self.label_names, self.task, self.columns, list(self.notes),
        )

    def digest(self) -> str:
        """A hash of the rows (texts, second texts, labels, class names): whether a later
        command reads the same rows as an earlier one did."""
        h = hashlib.sha1()
        h.update(json.dumps([self.texts, self.text_pairs, self.labels, self.label_names],
                            default=str).encode())
        return h.hexdigest()[:16]

    @property
    def num_labels(self) -> int:
        """Classes (1 for regression, as Hugging Face's ``num_labels``)."""
        if self.task == REGRESSION:
            return 1
        if self.label_names:
            return len(self.label_names)
        return max(self.labels) + 1 if self.labels else 0

    def describe(self) -> str:
        """One line for the user: rows, what was read, what the labels are."""
        what = describe_labels(self.labels, self.label_names, self.task)
        pair = "sentence pairs" if self.is_pair else "single texts"
        text = f"{self.source}: {len(self)} {pair}, {what}"
        return text + (f"; columns: {self.columns}" if self.columns else "")


def read_table(
    path: str | Path,
    columns: str | Sequence[str | int] | None = None,
    label_names: Sequence[str] | None = None,
    task: str | None = None,
) -> TextExamples:
    """Read a TSV (or CSV, or JSON Lines) file; see :mod:`exitwise.data.tables` for the columns
    it finds and ``columns`` (names, or 1-based positions for a header-less file: text,
    [pair,] label)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} is empty")
    spec = parse_columns_spec(columns)
    if spec and isinstance(spec[0], int) and path.suffix.lower() in JSON_LINES:
        raise DataError(f"{path}: a JSON Lines file names its fields; give --columns by "
                        f"name (its fields: {', '.join(rows[0][:-1])})")
    later: list[str] = []
    if spec and isinstance(spec[0], int) and 0 < spec[-1] <= len(rows[0]) - 1:
        later = [r[spec[-1] - 1] for r in rows[1:] if len(r) == len(rows[0])]
    cols = resolve_columns(rows[0][:-1], path, spec, later)
    texts, pairs, raw, where = split_fields(rows, path, cols)
    if not texts:
        raise DataError(f"{path} has a header but no rows")
    labels, names, kind = parse_labels(raw, label_names, where, task)
    return TextExamples(texts, labels, str(path), pairs, names, kind, cols.describe())


def read_parallel(
    folder: str | Path, split: str, label_names: Sequence[str] | None = None,
    task: str | None = None,
) -> TextExamples:
    """SentEval-style line files in ``folder``: ``s1.<split>``, optional ``s2.<split>`` (pairs)
    and ``labels.<split>``, one example per line, all of the same length."""
    folder = Path(folder)
    files = {n: folder / f"{n}.{split}" for n in ("s1", "s2", "labels")}
    if not files["s1"].is_file() or not files["labels"].is_file():
        raise DataError(f"{folder} has no s1.{split} / labels.{split}")

    def lines(p: Path) -> list[str]:
        try:
            return p.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM is no text
        except UnicodeDecodeError as err:
            raise DataError(f"{p} is not UTF-8 text ({err.reason})") from None

    first = lines(files["s1"])
    second = lines(files["s2"]) if files["s2"].is_file() else None
    raw = lines(files["labels"])

    def trimmed(got: list[str]) -> list[str]:
        # trailing blank lines are the file's end, not examples; a line missing in the middle
        # is not forgiven (the labels after it would land on the wrong sentences)
        while got and not got[-1].strip():
            got = got[:-1]
        return got

    raw, first = trimmed(raw), trimmed(first)
    second = None if second is None else trimmed(second)
    for name, got in (("s1", first), ("s2", second)):
        if got is not None and len(got) != len(raw):
            raise DataError(
                f"{files[name]} has {len(got)} lines but {files['labels']} has {len(raw)}"
            )
    where = [f"{files['labels']}:{i + 1}" for i in range(len(raw))]
    labels, names, kind = parse_labels(raw, label_names, where, task)
    cols = f"text={files['s1'].name}" + (f", text_pair={files['s2'].name}" if second else "")
    return TextExamples(
        [t.strip() for t in first], labels, str(folder), None if second is None else
        [t.strip() for t in second], names, kind, f"{cols}, label={files['labels'].name}",
    )


_SPLIT_FILES = {
    "train": ("train.tsv", "train.csv", "train.jsonl"),
    "dev": ("dev.tsv", "validation.tsv", "dev.csv", "validation.csv", "dev_matched.tsv",
            "dev.jsonl", "validation.jsonl"),
    "validation": ("dev.tsv", "validation.tsv", "dev.csv", "validation.csv",
                   "dev_matched.tsv", "dev.jsonl", "validation.jsonl"),
    "test": ("test.tsv", "test.csv", "test.jsonl"),
}
_PARALLEL_SPLITS = {"train": ("train",), "dev": ("dev", "valid", "validation"),
                    "validation": ("dev", "valid", "validation"), "test": ("test",)}


def split_location(source: str | Path, split: str) -> str:
    """Where :func:`load_examples` reads ``split`` of ``source`` from, without reading it: the
    resolved file (a single file serves every split), the resolved ``s1.<split>`` of line
    files, or ``name[split]`` of a Hugging Face dataset. Two (source, split) pairs with one
    location are the same rows."""
    p = Path(source)
    if p.is_file():
        return str(p.resolve())
    if p.is_dir():
        found = _split_in_folder(p, split)
        if found is None:
            return f"{p.resolve()}[{split}]"
        kind, name = found
        return str((p / (name if kind == "table" else f"s1.{name}")).resolve())
    return f"{source}[{'validation' if split == 'dev' else split}]"


def _split_in_folder(folder: Path, split: str) -> tuple[str, str] | None:
    """Which file of ``folder`` holds ``split``: ("table", file name) or ("lines", the
    suffix of SentEval line files), or None."""
    for name in _SPLIT_FILES.get(split, (f"{split}.tsv",)):
        if (folder / name).is_file():
            return "table", name
    for name in _PARALLEL_SPLITS.get(split, (split,)):
        if (folder / f"s1.{name}").is_file() and (folder / f"labels.{name}").is_file():
            return "lines", name
    return None


def load_examples(
    source: str | Path,
    split: str = "train",
    columns: str | Sequence[str | int] | None = None,
    label_names: Sequence[str] | None = None,
    task: str | None = None,
) -> TextExamples:
    """Examples of ``split`` from ``source`` (see module doc).

    columns: which columns to read, for tables whose header exitwise does not recognise or
        that have none (see :func:`read_table`).
    label_names: the class names of a trained model (``id2label``), so that an evaluation split
        maps its string labels to the same ids; labels outside them are refused.
    task: force "classification" or "regression" (default: from the labels).
    """
    p = Path(source)
    if p.is_file():
        return read_table(p, columns, label_names, task)
    if p.is_dir():
        found = _split_in_folder(p, split)
        if found is not None:
            kind, name = found
            if kind == "table":
                return read_table(p / name, columns, label_names, task)
            return read_parallel(p, name, label_names, task)
        raise DataError(
            f"{p} has no file for split {split!r} (looked for "
            f"{', '.join(_SPLIT_FILES.get(split, (f'{split}.tsv',)))}, or s1/s2/labels."
            f"{'/'.join(_PARALLEL_SPLITS.get(split, (split,)))})"
        )
    if str(source).startswith((".", "/")) or Path(str(source)).suffix in (
            ".tsv", ".csv", *JSON_LINES):
        raise DataError(f"data path {source} does not exist")
    return _load_hf(str(source), split, columns, label_names, task)


def _load_hf(
    name: str, split: str, columns: Any, label_names: Sequence[str] | None, task: str | None,
) -> TextExamples:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is not a local file or folder, and loading it from the Hugging Face hub "
            "needs the 'datasets' package: pip install 'exitwise[data]'"
        ) from None
    hf_split = "validation" if split == "dev" else split
    parts = name.split("/")
    try:
        if len(parts) == 2 and parts[0] == "glue":
            if parts[1] == "mnli" and hf_split == "validation":
                hf_split = "validation_matched"
            ds = datasets.load_dataset("nyu-mll/glue", parts[1], split=hf_split)
        else:
            ds = datasets.load_dataset(name, split=hf_split)
    except Exception as err:  # network errors, unknown names: all mean "cannot get the data"
        raise DataError(
            f"could not load Hugging Face dataset {name!r} split {hf_split!r} "
            f"({type(err).__name__}: {str(err)[:200]}). Point --data at a local folder with "
            "train.tsv/dev.tsv instead."
        ) from None
    return examples_from_hf(ds, f"{name}[{hf_split}]", columns, label_names, task)


def examples_from_hf(
    ds: Any, source: str, columns: Any = None, label_names: Sequence[str] | None = None,
    task: str | None = None,
) -> TextExamples:
    """:class:`TextExamples` from a loaded ``datasets.Dataset`` (pairs, ClassLabel names and
    float regression labels understood; rows without a gold label (-1, as in SNLI) dropped)."""
    names = list(ds.column_names)
    low = [c.lower() for c in names]
    spec = parse_columns_spec(columns)
    if spec:
        if any(isinstance(c, int) for c in spec):
            spec = [names[int(c) - 1] for c in spec]
        missing = [c for c in spec if c not in names]
        if missing:
            raise DataError(f"{source}: no column {missing}; it has {names}")
        text, label = spec[0], spec[-1]
        pair = spec[1] if len(spec) == 3 else None
    else:
        text = pair = label = None
        for a, b in PAIR_COLUMNS:
            if a in low and b in low:
                text, pair = names[low.index(a)], names[low.index(b)]
                break
        text = text or next((names[low.index(c)] for c in TEXT_COLUMNS if c in low), None)
        label = next((names[low.index(c)] for c in LABEL_COLUMNS if c in low), None)
        if text is None or label is None:
            raise DataError(f"dataset {source} has no text/label columns: {names}; give columns")
    feature = ds.features.get(label)
    class_names = list(getattr(feature, "names", None) or []) or None
    raw = list(ds[label])
    keep = [i for i, v in enumerate(raw) if not (isinstance(v, int) and v < 0)]
    notes = []
    if len(keep) < len(raw):
        notes.append(f"dropped {len(raw) - len(keep)} rows without a gold label (-1)")
    texts = [ds[text][i] for i in keep]
    pairs = None if pair is None else [ds[pair][i] for i in keep]
    values = [raw[i] for i in keep]
    if class_names and label_names and list(label_names) != class_names:
        raise DataError(f"{source}: its classes {class_names} differ from the model's "
                        f"{list(label_names)}")
    if class_names or (task != REGRESSION and all(isinstance(v, int) for v in values)):
        labels, kind = [int(v) for v in values], CLASSIFICATION
    elif all(isinstance(v, (int, float)) for v in values):
        labels, kind = [float(v) for v in values], REGRESSION
        class_names = None
    else:
        labels, class_names, kind = parse_labels([str(v) for v in values], label_names,
                                                 task=task)
    cols = f"text={text!r}" + (f", text_pair={pair!r}" if pair else "") + f", label={label!r}"
    ignored = [c for c in names if c not in (text, pair, label)]
    if ignored:
        cols += f"; ignored: {', '.join(map(repr, ignored))}"
    return TextExamples(texts, labels, source, pairs, class_names, kind, cols, notes)


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenizes once up front (pairs as ``tokenizer(text, text_pair)``); items are dicts of
    lists (input_ids, attention_mask, token_type_ids, ..., labels). Rows longer than
    ``max_length`` tokens are cut; ``truncated`` counts them."""

    def __init__(self, examples: TextExamples, tokenizer: Any, max_length: int = 128) -> None:
        if len(examples) == 0:
            raise DataError("no examples to tokenize")
        if examples.text_pairs is not None:
            enc = tokenizer(examples.texts, examples.text_pairs, truncation=True,
                            max_length=max_length)
        else:
            enc = tokenizer(examples.texts, truncation=True, max_length=max_length)
        self.features = [
            {k: enc[k][i] for k in enc.keys()} | {"labels": examples.labels[i]}
            for i in range(len(examples))
        ]
        # rows cut at max_length (only the rows that reach it are tokenized again, uncut)
        full = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= max_length]
        if full:
            pairs = examples.text_pairs
            again = tokenizer([examples.texts[i] for i in full],
                              *([[pairs[i] for i in full]] if pairs is not None else []))
            full = [i for i, ids in zip(full, again["input_ids"]) if len(ids) > max_length]
        self.truncated = len(full)
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    def fingerprint(self) -> str:
        """A hash of every item (token ids and labels): a resumed run checks that it trains
        on the same rows (an edited data file at the same path is other data)."""
        h = hashlib.sha1()
        for item in self.features:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]


def make_collator(tokenizer: Any):
    """Dynamic right-padding to the longest row of each batch (HF DataCollatorWithPadding)."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")


def train_holdout_split(examples: TextExamples, holdout: int | float, seed: int = 0):
    """Split off a held-out slice (for calibration) from training examples, shuffled with
    ``seed``. ``holdout`` is a count or a fraction."""
    n = len(examples)
    k = int(round(holdout * n)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if not 0 < k < n:
        raise DataError(f"held-out size {holdout} must leave both parts non-empty (have {n} rows)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    return examples.subset(order[k:]), examples.subset(order[:k])

"""Text-classification data: local TSV/CSV files, a folder of splits, or a Hugging Face dataset.

SST-2 as shipped in GLUE is ``label<TAB>sentence`` or ``sentence<TAB>label`` with a header;
both orders are read (the header names the columns). Every problem with a file is raised as a
:class:`~exitwise.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import DataError

TEXT_COLUMNS = ("sentence", "text", "sentence1", "review", "content")
LABEL_COLUMNS = ("label", "labels", "class")


@dataclass
class TextExamples:
    """Parallel lists of texts and integer labels (labels may be -1 when unknown)."""

    texts: list[str]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextExamples":
        return TextExamples([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.source)

    @property
    def num_labels(self) -> int:
        return max(self.labels) + 1 if self.labels else 0


def read_table(path: str | Path) -> TextExamples:
    """Read a TSV (or CSV) file with a header naming a text column and a label column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    is_csv = path.suffix.lower() == ".csv"
    delimiter = "," if is_csv else "\t"
    # GLUE TSVs contain bare quote characters inside sentences, so TSV is read without quoting;
    # CSV needs standard quoting, or any text with a comma in it would split into two fields.
    quoting = csv.QUOTE_MINIMAL if is_csv else csv.QUOTE_NONE
    texts: list[str] = []
    labels: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty")
            names = [h.strip().lower() for h in header]
            text_col = next((names.index(c) for c in TEXT_COLUMNS if c in names), None)
            label_col = next((names.index(c) for c in LABEL_COLUMNS if c in names), None)
            if text_col is None or label_col is None:
                raise DataError(
                    f"{path}: the header {header!r} must name a text column "
                    f"({'/'.join(TEXT_COLUMNS)}) and a label column ({'/'.join(LABEL_COLUMNS)})"
                )
            for row in reader:
                lineno = reader.line_num  # physical line (quoted CSV fields may span lines)
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(names):
                    raise DataError(
                        f"{path}:{lineno}: expected {len(names)} "
                        f"{'comma' if is_csv else 'tab'}-separated fields, got {len(row)}"
                    )
                try:
                    label = int(row[label_col])
                except ValueError:
                    raise DataError(
                        f"{path}:{lineno}: label {row[label_col]!r} is not an integer"
                    ) from None
                if label < 0:
                    raise DataError(f"{path}:{lineno}: label {label} is negative")
                texts.append(row[text_col].strip())
                labels.append(label)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{path}: unreadable {'CSV' if is_csv else 'TSV'} ({err})") from None
    if not texts:
        raise DataError(f"{path} has a header but no rows")
    return TextExamples(texts, labels, str(path))


_SPLIT_FILES = {
    "train": ("train.tsv", "train.csv"),
    "dev": ("dev.tsv", "validation.tsv", "dev.csv", "validation.csv"),
    "validation": ("dev.tsv", "validation.tsv", "dev.csv", "validation.csv"),
    "test": ("test.tsv", "test.csv"),
}


def load_examples(source: str | Path, split: str = "train") -> TextExamples:
    """Examples of ``split`` from ``source``.

    source: a file (.tsv/.csv), a folder holding ``train.tsv``/``dev.tsv``, or a Hugging Face
    dataset id such as ``glue/sst2`` or ``stanfordnlp/sst2`` (needs the ``data`` extra and a
    network or a local cache).
    """
    p = Path(source)
    if p.is_file():
        return read_table(p)
    if p.is_dir():
        for name in _SPLIT_FILES.get(split, (f"{split}.tsv",)):
            if (p / name).is_file():
                return read_table(p / name)
        raise DataError(f"{p} has no file for split {split!r} (looked for {_SPLIT_FILES.get(split)})")
    if str(source).startswith((".", "/")) or Path(str(source)).suffix in (".tsv", ".csv"):
        raise DataError(f"data path {source} does not exist")
    return _load_hf(str(source), split)


def _load_hf(name: str, split: str) -> TextExamples:
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
            ds = datasets.load_dataset("nyu-mll/glue", parts[1], split=hf_split)
        else:
            ds = datasets.load_dataset(name, split=hf_split)
    except Exception as err:  # network errors, unknown names: all mean "cannot get the data"
        raise DataError(
            f"could not load Hugging Face dataset {name!r} split {hf_split!r} ({type(err).__name__}: "
            f"{str(err)[:200]}). Point --data at a local folder with train.tsv/dev.tsv instead."
        ) from None
    text_col = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in ds.column_names), None)
    if text_col is None or label_col is None:
        raise DataError(f"dataset {name!r} has no text/label columns: {ds.column_names}")
    return TextExamples(list(ds[text_col]), [int(x) for x in ds[label_col]], name)


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenizes once up front; items are dicts of lists (input_ids, attention_mask, labels, ...)."""

    def __init__(self, examples: TextExamples, tokenizer: Any, max_length: int = 128) -> None:
        if len(examples) == 0:
            raise DataError("no examples to tokenize")
        enc = tokenizer(examples.texts, truncation=True, max_length=max_length)
        self.features = [
            {k: enc[k][i] for k in enc.keys()} | {"labels": examples.labels[i]}
            for i in range(len(examples))
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def make_collator(tokenizer: Any):
    """Dynamic right-padding to the longest row of each batch (HF DataCollatorWithPadding)."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")


def train_holdout_split(examples: TextExamples, holdout: int | float, seed: int = 0):
    """Split off a held-out slice (for calibration) from training examples, stratified by nothing,
    shuffled with ``seed``. ``holdout`` is a count or a fraction."""
    n = len(examples)
    k = int(round(holdout * n)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if not 0 < k < n:
        raise DataError(f"held-out size {holdout} must leave both parts non-empty (have {n} rows)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    return examples.subset(order[k:]), examples.subset(order[:k])

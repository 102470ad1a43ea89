"""Reading labelled text from TSV/CSV (and JSON Lines) files as they come: GLUE's, SentEval's,
the user's own.

A table names (or, without a header, is told by ``columns``) one text column, optionally a
second one for sentence pairs, and one label column. Every GLUE task's original files are read
as they are: their headers differ per task (SST-2 ``sentence``/``label``; MRPC ``#1 String``/
``#2 String``/``Quality``; QQP ``question1``/``question2``/``is_duplicate``; QNLI
``question``/``sentence``; MNLI, RTE, WNLI ``sentence1``/``sentence2`` with ``gold_label`` or
``label``; STS-B ``sentence1``/``sentence2``/``score``); CoLA's header-less files and the
header-less STS-B copy need ``columns``. Which columns were used is always reported
(:attr:`TableColumns.describe`); a text column is never dropped silently.

A JSON Lines file (``.jsonl``, one object per line) is a table whose header is its first
object's keys, so the same column names apply.

Labels (:func:`parse_labels`): integers stay integers (class ids); numbers with a decimal point
or an exponent make a regression target; anything else is a class name, mapped to ids as
Hugging Face does (``label2id``), sorted unless the names are given (e.g. by a trained model).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError

# Text columns, pairs first (so QNLI's question/sentence is read as a pair, not as sentence).
PAIR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sentence1", "sentence2"),
    ("#1 string", "#2 string"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text", "text_pair"),
    ("text_a", "text_b"),
    ("sentence_a", "sentence_b"),
    ("query", "passage"),
)
TEXT_COLUMNS = ("sentence", "text", "review", "content", "question", "document", "sentence1")
LABEL_COLUMNS = ("label", "labels", "gold_label", "score", "quality", "is_duplicate", "class",
                 "target")
REGRESSION = "regression"
CLASSIFICATION = "classification"
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")
_INT = re.compile(r"^[+-]?\d+$")


@dataclass
class TableColumns:
    """Where the text, the optional pair text and the label sit (0-based), by name if any."""

    text: int
    label: int
    text_pair: int | None = None
    names: list[str] = field(default_factory=list)
    header: bool = True

    def name(self, index: int | None) -> str:
        if index is None:
            return "-"
        return repr(self.names[index]) if self.header and index < len(self.names) else (
            f"column {index + 1}")

    def describe(self) -> str:
        """E.g. "text='sentence1', text_pair='sentence2', label='gold_label'; ignored: ..."."""
        parts = [f"text={self.name(self.text)}"]
        if self.text_pair is not None:
            parts.append(f"text_pair={self.name(self.text_pair)}")
        parts.append(f"label={self.name(self.label)}")
        used = {self.text, self.label, self.text_pair}
        ignored = [self.name(i) for i in range(len(self.names)) if i not in used]
        return ", ".join(parts) + (f"; ignored: {', '.join(ignored)}" if ignored else "")


def parse_columns_spec(spec: str | Sequence[str | int] | None) -> list[str | int] | None:
    """``"sentence1,sentence2,label"`` (names) or ``"8,9,10"`` (1-based positions, for a
    header-less file) -> a list; text, [text pair,] label, in that order."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(items) not in (2, 3) or any(i == "" for i in items):
        raise DataError(
            f"columns {spec!r}: give the text column, optionally the second text column of a "
            "pair, and the label column, by header name or 1-based position, e.g. "
            "'sentence,label', 'sentence1,sentence2,label' or '8,9,10'"
        )
    out: list[str | int] = []
    for i in items:
        if isinstance(i, int) or (isinstance(i, str) and i.isdigit()):
            if int(i) < 1:
                raise DataError(f"columns {spec!r}: positions count from 1")
            out.append(int(i))
        else:
            out.append(str(i))
    if len({type(i) for i in out}) > 1:
        raise DataError(f"columns {spec!r}: use names or positions, not both")
    return out


def _find_columns(names: list[str]) -> tuple[int | None, int | None, int | None]:
    low = [n.strip().lower() for n in names]
    text = pair = None
    for a, b in PAIR_COLUMNS:
        if a in low and b in low:
            text, pair = low.index(a), low.index(b)
            break
    if text is None:
        text = next((low.index(c) for c in TEXT_COLUMNS if c in low), None)
    label = next((low.index(c) for c in LABEL_COLUMNS if c in low), None)
    return text, pair, label


def resolve_columns(
    first_row: list[str], path: Path, columns: list[str | int] | None,
    later_labels: Sequence[str] = (),
) -> TableColumns:
    """Find the columns from the header (or ``columns``); DataError says what to give.
    ``later_labels``: the label fields of the rows after the first, which tell a header
    given to column positions by its kind (a name above numbers)."""
    low = [c.strip().lower() for c in first_row]
    if columns and isinstance(columns[0], int):  # positions: a header-less file, mostly
        idx = [int(c) - 1 for c in columns]
        bad = [i + 1 for i in idx if i >= len(first_row)]
        if bad:
            raise DataError(f"{path}: columns {bad} do not exist; the file has {len(first_row)}")
        # GLUE test files and hand-made ones may still carry a header: a first row whose
        # label field is a label column's name is one, and so is a first row whose label
        # field is no number above labels that all are (numeric classes or targets)
        first = first_row[idx[-1]].strip()
        numbers = [v.strip() for v in later_labels]
        header = low[idx[-1]] in LABEL_COLUMNS or (
            bool(numbers) and not _is_number(first)
            and all(_is_number(v) for v in numbers))
        return TableColumns(idx[0], idx[-1], idx[1] if len(idx) == 3 else None,
                            names=list(first_row), header=header)
    if columns:
        missing = [c for c in columns if str(c).strip().lower() not in low]
        if missing:
            raise DataError(f"{path}: no column named {missing}; the header is {first_row!r}")
        idx = [low.index(str(c).strip().lower()) for c in columns]
        return TableColumns(idx[0], idx[-1], idx[1] if len(idx) == 3 else None,
                            names=list(first_row))
    text, pair, label = _find_columns(first_row)
    if text is None or label is None:
        what = "text column" if text is None else "label column"
        raise DataError(
            f"{path}: found no {what} in the first row {first_row!r}. A header must name the "
            f"text ({'/'.join(TEXT_COLUMNS)}, or a pair such as sentence1/sentence2) and the "
            f"label ({'/'.join(LABEL_COLUMNS)}); for a file without a header (GLUE's CoLA, "
            "the header-less STS-B) give the columns, e.g. --columns 4,2 or --columns 8,9,10 "
            "(text, [second text,] label; 1-based)"
        )
    return TableColumns(text, label, pair, names=list(first_row))


JSON_LINES = (".jsonl", ".ndjson")


def read_json_lines(path: Path) -> list[list[str]]:
    """A JSON Lines file (one object per line) as :func:`read_rows` gives a table: the first
    object's keys as the header, then each object's values in that order (strings as they
    are, numbers and booleans as JSON writes them, null as an empty field), blank lines
    skipped; each row ends with its line number."""
    rows: list[list[str]] = []
    keys: list[str] | None = None
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not a JSON object ({err.msg})") from None
        if not isinstance(item, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(item).__name__}")
        if keys is None:
            keys = [str(k) for k in item]
            rows.append([*keys, "0"])
        missing = [k for k in keys if k not in item]
        if missing:
            raise DataError(f"{path}:{n}: the object has no {missing} (the first one has)")
        rows.append([_field(item[k]) for k in keys] + [str(n)])
    return rows


def _field(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def read_rows(path: Path) -> list[list[str]]:
    """All rows of a TSV (or CSV, or JSON Lines) file, header included, blank lines skipped."""
    if path.suffix.lower() in JSON_LINES:
        return read_json_lines(path)
    is_csv = path.suffix.lower() == ".csv"
    # GLUE TSVs contain bare quote characters inside sentences, so TSV is read without quoting;
    # CSV needs standard quoting, or any text with a comma in it would split into two fields.
    quoting = csv.QUOTE_MINIMAL if is_csv else csv.QUOTE_NONE
    rows: list[list[str]] = []
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which is no header text
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="," if is_csv else "\t", quoting=quoting)
            for row in reader:
                if row and any(c.strip() for c in row):
                    rows.append(row)
                    rows[-1].append(str(reader.line_num))  # its line, for error messages
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{path}: unreadable {'CSV' if is_csv else 'TSV'} ({err})") from None
    return rows


def _is_number(value: str) -> bool:
    return bool(_INT.match(value) or _FLOAT.match(value))


def parse_labels(
    raw: Sequence[str], label_names: Sequence[str] | None = None, where: Sequence[str] = (),
    task: str | None = None,
) -> tuple[list[int] | list[float], list[str] | None, str]:
    """Label strings -> (labels, class names or None, task).

    All integers: class ids as they are; with a negative one (-1 / 1), class names in numeric
    order instead (ids from 0). Any decimal/exponent number
    (and all numeric): regression targets (floats). Otherwise class names -> ids in the order
    of ``label_names`` when given (a trained model's), else sorted. ``task`` forces
    "classification" or "regression". ``where``: per value, its "file:line" for errors.
    """
    values = [v.strip() for v in raw]
    loc = list(where) or [""] * len(values)
    empty = next((i for i, v in enumerate(values) if not v), None)
    if empty is not None:  # else "" would become a class of its own
        raise DataError(f"{loc[empty]}: the label is empty; fill it in or drop the row")
    if task not in (None, CLASSIFICATION, REGRESSION):
        raise DataError(f"task must be {CLASSIFICATION!r} or {REGRESSION!r}; got {task!r}")
    numeric = all(_INT.match(v) or _FLOAT.match(v) for v in values)
    if task == REGRESSION or (task is None and numeric and any(_FLOAT.match(v) for v in values)
                              and not label_names):
        if not numeric:
            bad = next(i for i, v in enumerate(values) if not (_INT.match(v) or _FLOAT.match(v)))
            raise DataError(f"{loc[bad]}: regression target {values[bad]!r} is not a number")
        return [float(v) for v in values], None, REGRESSION
    if label_names:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
        out = []
        for i, v in enumerate(values):
            if v in index:
                out.append(index[v])
            elif _INT.match(v) and 0 <= int(v) < len(names):
                out.append(int(v))  # ids written as numbers in a file of a named task
            else:
                raise DataError(
                    f"{loc[i]}: label {v!r} is not one of the model's labels {names}"
                )
        return out, names, CLASSIFICATION
    is_num = [bool(_INT.match(v) or _FLOAT.match(v)) for v in values]
    if any(is_num) and not all(is_num):
        a, b = is_num.index(True), is_num.index(False)
        raise DataError(
            f"{loc[b]}: label {values[b]!r} is a name but {loc[a]} has the number "
            f"{values[a]!r}: the labels mix numbers and names; fix the file"
        )
    if all(_INT.match(v) for v in values):
        ids = [int(v) for v in values]
        if min(ids) < 0:  # -1 / 1 (as SVM-style files write two classes): named classes,
            names = [str(v) for v in sorted(set(ids))]  # in numeric order
            index = {int(n): i for i, n in enumerate(names)}
            return [index[v] for v in ids], names, CLASSIFICATION
        return ids, None, CLASSIFICATION
    names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    return [index[v] for v in values], names, CLASSIFICATION


def split_fields(
    rows: list[list[str]], path: Path, cols: TableColumns
) -> tuple[list[str], list[str] | None, list[str], list[str]]:
    """(texts, pair texts or None, raw labels, "file:line" per row) of the data rows."""
    width = len(rows[0]) - 1  # the last field is the line number read_rows added
    body = rows[1:] if cols.header else rows
    texts: list[str] = []
    pairs: list[str] | None = [] if cols.text_pair is not None else None
    labels: list[str] = []
    where: list[str] = []
    for row in body:
        line, fields = row[-1], row[:-1]
        if len(fields) != width:
            sep = "comma" if path.suffix.lower() == ".csv" else "tab"
            raise DataError(
                f"{path}:{line}: expected {width} {sep}-separated fields, got {len(fields)}"
            )
        texts.append(fields[cols.text].strip())
        if pairs is not None:
            pairs.append(fields[cols.text_pair].strip())
        labels.append(fields[cols.label])
        where.append(f"{path}:{line}")
    return texts, pairs, labels, where


def describe_labels(labels: Sequence[Any], names: Sequence[str] | None, task: str) -> str:
    """E.g. "3 classes (contradiction, entailment, neutral)" or "regression, 0.00..5.00"."""
    if task == REGRESSION:
        return f"regression targets {min(labels):.2f}..{max(labels):.2f}"
    k = (max(labels) + 1) if labels else 0
    if names:
        k = len(names)
        return f"{k} classes ({', '.join(names)})"
    return f"{k} classes (ids 0..{k - 1})"

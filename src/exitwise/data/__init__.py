"""Data loading for exitwise recipes, benchmarks and the CLI."""

from .text import (
    TextExamples,
    TokenizedDataset,
    load_examples,
    make_collator,
    read_table,
    train_holdout_split,
)

__all__ = [
    "TextExamples",
    "TokenizedDataset",
    "load_examples",
    "make_collator",
    "read_table",
    "train_holdout_split",
]

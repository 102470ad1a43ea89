"""Data loading for exitwise recipes, benchmarks and the CLI."""

from .text import (
    TextExamples,
    TokenizedDataset,
    load_examples,
    make_collator,
    read_table,
    train_holdout_split,
)
from .vision import (
    FASHION_MNIST_CLASSES,
    ImageClassificationDataset,
    ImageSplits,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ImageClassificationDataset",
    "ImageSplits",
    "TextExamples",
    "TokenizedDataset",
    "find_fashion_mnist",
    "load_examples",
    "load_fashion_mnist",
    "make_collator",
    "read_idx",
    "read_table",
    "train_holdout_split",
]

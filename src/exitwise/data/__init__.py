"""Data loading for exitwise recipes, benchmarks and the CLI."""

from .text import (
    TextExamples,
    TokenizedDataset,
    examples_from_hf,
    load_examples,
    make_collator,
    read_parallel,
    read_table,
    split_location,
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
    "examples_from_hf",
    "read_parallel",
    "find_fashion_mnist",
    "load_examples",
    "load_fashion_mnist",
    "make_collator",
    "read_idx",
    "read_table",
    "split_location",
    "train_holdout_split",
]

"""Per-exit accuracy of a multi-exit model on a labelled dataset, and a table to print it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import DataError, InputError
from .collate import default_collator


@torch.inference_mode()
def evaluate_exits(
    model: Any,
    dataset: Dataset,
    data_collator: Callable[[list], dict[str, torch.Tensor]] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[float]:
    """Accuracy of every exit (shallowest first) on ``dataset``.

    One forward per batch gives all exits' logits (B, C) at once; raw logits are used (a
    temperature does not change the arg-max). The model's train/eval mode is restored after.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise DataError("the evaluation dataset is empty")
    collate = data_collator or default_collator(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros(model.num_exits, dtype=torch.long)
    seen = 0
    try:
        for batch in tqdm(loader, desc="evaluating exits", disable=not progress, leave=False):
            labels = batch.pop("labels", batch.pop("label", None))
            if labels is None:
                raise DataError("the evaluation batches have no 'labels'")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            labels = model.check_labels(labels.to(device), int(labels.shape[0]))
            logits = model(**batch).stacked()  # (B, K, C)
            correct += (logits.argmax(-1) == labels[:, None]).sum(0).cpu()
            seen += int(labels.shape[0])
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError("the evaluation dataset yielded no examples")
    return [c / seen for c in correct.tolist()]


def format_exit_table(accuracies: Sequence[float], exit_layers: Sequence[int]) -> str:
    """A fixed-width table: exit index, depth, accuracy (%)."""
    if len(accuracies) != len(exit_layers):
        raise InputError(f"{len(accuracies)} accuracies for {len(exit_layers)} exits")
    lines = [f"{'exit':>4}  {'layer':>5}  {'accuracy':>8}"]
    for k, (depth, acc) in enumerate(zip(exit_layers, accuracies)):
        tag = "  (final)" if k == len(exit_layers) - 1 else ""
        lines.append(f"{k:>4}  {depth:>5}  {100 * acc:>7.2f}%{tag}")
    return "\n".join(lines)

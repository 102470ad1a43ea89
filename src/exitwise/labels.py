"""Label checks shared by the eager model and the exported runner."""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError


def validate_labels(labels: Any, num_labels: int, task: str,
                    batch_size: int | None = None) -> torch.Tensor:
    """(B,) labels checked for a model of ``num_labels`` outputs and ``task``: class ids in
    [0, num_labels), or finite targets (float) for regression; InputError otherwise."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise InputError(f"labels must be (batch,), got shape {tuple(labels.shape)}")
    if batch_size is not None and labels.shape[0] != batch_size:
        raise InputError(f"{labels.shape[0]} labels for a batch of {batch_size}")
    if task == "regression":
        if not bool(torch.isfinite(labels.float()).all()):
            raise InputError("regression targets must be finite numbers")
        return labels.float()
    if labels.is_floating_point() and bool((labels != labels.round()).any()):
        raise InputError(
            "labels are fractional numbers but this is a classification model; a "
            "regression model has num_labels=1"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise InputError(
            f"labels must be in [0, {num_labels}); got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    return labels

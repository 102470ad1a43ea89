"""A dependency-free padding collator for datasets of token-id dicts.

Items are dicts such as ``{"input_ids": [...], "attention_mask": [...], "labels": 1}`` (lists
or 1-D tensors, varying lengths). The batch pads every sequence key to the longest row
(right padding) and stacks scalars, giving input_ids (B, T), attention_mask (B, T),
token_type_ids (B, T) when present, labels (B,). An ``(image, label)`` pair, what a
torchvision dataset yields, is read as ``{"pixel_values": image, "labels": label}`` (as
:func:`exitwise.runtime.online.split_batch` reads such batches for caches and streams).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import DataError

SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def as_example(item: Any) -> Mapping[str, Any]:
    """One dataset item as a dict: dicts as they are, ``(inputs, label)`` pairs as
    ``{"pixel_values": inputs, "labels": label}``."""
    if isinstance(item, Mapping):  # dicts, HF BatchEncoding
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return {"pixel_values": item[0], "labels": item[1]}
    raise DataError(
        f"cannot read a training example of type {type(item).__name__}: give dicts (e.g. "
        "{'input_ids': [...], 'labels': 1}) or (image, label) pairs")


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], str))


def _tensor(value: Any, key: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        hint = (" (a PIL image: give the dataset a transform that ends in "
                "torchvision.transforms.ToTensor() or PILToTensor())"
                if hasattr(value, "getpixel") else "")
        raise DataError(f"the examples' {key!r} is a {type(value).__name__}, not something a "
                        f"tensor can be made of{hint}") from None


class PaddingCollator:
    """Pads ``input_ids`` with ``pad_token_id`` and the other sequence keys with 0."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise DataError("cannot collate an empty list of examples")
        items = [as_example(it) for it in items]
        keys = list(items[0].keys())
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            if key not in ("labels", "label") and _is_text(items[0][key]):
                # a raw text column beside the tokenized ones (a datasets.Dataset keeps its
                # "sentence" after map(tokenize)): no model input, left out as HF's Trainer
                # leaves out the columns its model does not take
                continue
            if any(key not in it for it in items):
                raise DataError(f"some examples lack the key {key!r}")
            values = [_tensor(it[key], key) for it in items]
            if key in SEQUENCE_KEYS or values[0].dim() == 1:
                longest = max(int(v.shape[0]) for v in values)
                fill = self.pad_token_id if key == "input_ids" else 0
                out = torch.full((len(values), longest), fill, dtype=values[0].dtype)
                for r, v in enumerate(values):
                    out[r, : v.shape[0]] = v
                batch[key] = out
            else:
                shapes = {tuple(v.shape) for v in values}
                if len(shapes) > 1:
                    raise DataError(
                        f"the examples' {key!r} have different shapes {sorted(shapes)[:3]}: "
                        "a batch needs one shape (for images, resize or crop them to one "
                        "size in the dataset's transform)")
                batch[key] = torch.stack(values)
        if "input_ids" in batch and "attention_mask" not in batch:
            lengths = torch.tensor([len(torch.as_tensor(it["input_ids"])) for it in items])
            batch["attention_mask"] = (
                torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]
            ).long()
        if "label" in batch and "labels" not in batch:
            batch["labels"] = batch.pop("label")
        return batch


def default_collator(model: Any) -> PaddingCollator:
    """A :class:`PaddingCollator` with the backbone's own pad id (0 if it has none)."""
    config = getattr(getattr(model, "backbone", None), "config", None)
    pad = getattr(config, "pad_token_id", None)
    return PaddingCollator(0 if pad is None else pad)

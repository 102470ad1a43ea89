"""Draft exits shipped with the package, found by the model they were tuned for.

A shipped drafter is a folder under ``exitwise/assets/drafters/`` holding what
``MultiExitModel.save_pretrained`` writes for the exits alone (``exit_config.json``,
``exit_heads.safetensors``) and ``drafter.json``: the model's fingerprint, the decoding options
it was measured best with (exit layer, draft length, n-gram order) and where it came from (the
command that tuned it, its held-out agreement). Each is produced by a committed script
(``benchmarks/ship_drafter.py``) from exits tuned on the model's own answers.

:func:`find_drafter` matches a decoder by its fingerprint: architecture, depth, widths and a
checksum of a few rows of its token embedding, so a drafter is only ever used on the very
weights it was tuned for (a fine-tuned variant of the same architecture does not match).
Drafting stays lossless whatever the drafter: it only proposes tokens the full model verifies.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "drafters"
DRAFTER_FILE = "drafter.json"
_ROWS = 16  # embedding rows summed into the checksum (first and last)
_RTOL = 1e-6


def fingerprint(backbone: Any) -> dict[str, Any]:
    """What identifies a decoder's weights: model type, layers, hidden and vocab sizes, and
    sums of the first and last embedding rows (float64)."""
    weight = backbone.model.get_input_embeddings().weight.detach()
    return {
        "model_type": backbone.describe().get("model_type"),
        "num_layers": int(backbone.num_layers), "hidden_size": int(backbone.hidden_size),
        "vocab_size": int(backbone.vocab_size),
        "embed_head_sum": float(weight[:_ROWS].double().sum()),
        "embed_tail_abs_sum": float(weight[-_ROWS:].double().abs().sum()),
    }


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Fingerprints equal: exact for the shapes, to a relative 1e-6 for the checksums."""
    for key in ("model_type", "num_layers", "hidden_size", "vocab_size"):
        if a.get(key) != b.get(key):
            return False
    for key in ("embed_head_sum", "embed_tail_abs_sum"):
        x, y = a.get(key), b.get(key)
        if x is None or y is None or abs(x - y) > _RTOL * max(1.0, abs(x), abs(y)):
            return False
    return True


@dataclass
class ShippedDrafter:
    """One shipped drafter: its folder and ``drafter.json``."""

    folder: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_layer(self) -> int:
        return int(self.meta["exit_layer"])

    @property
    def options(self) -> dict[str, Any]:
        """The self-speculative options it was measured best with (draft_len, ngram, ...)."""
        return dict(self.meta.get("options", {}))


def shipped_drafters(root: Path | None = None) -> list[ShippedDrafter]:
    """Every drafter folder under ``root`` (default: the package's own)."""
    root = ASSETS if root is None else Path(root)
    if not root.is_dir():
        return []
    return [ShippedDrafter(d, json.loads((d / DRAFTER_FILE).read_text()))
            for d in sorted(root.iterdir()) if (d / DRAFTER_FILE).is_file()]


def find_drafter(backbone: Any, root: Path | None = None) -> ShippedDrafter | None:
    """The shipped drafter tuned for exactly this decoder's weights, or None."""
    mine = fingerprint(backbone)
    for d in shipped_drafters(root):
        if same_model(d.meta.get("fingerprint", {}), mine):
            return d
    return None


# model (the HF causal LM) -> its multi-exit model with the shipped heads; weak, so the
# heads go when the user's model does
_ATTACHED: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def with_shipped_drafter(backbone: Any, drafter: ShippedDrafter) -> Any:
    """A ``MultiExitModel`` of the shipped exits over ``backbone``'s own model (loaded once per
    model; the model's weights are shared, never copied or changed)."""
    from ..model import MultiExitModel

    lm = backbone.model
    cached = _ATTACHED.get(lm)
    if cached is not None and cached[0] == drafter.folder:
        return cached[1]
    with torch.inference_mode(False):
        model = MultiExitModel.from_pretrained(drafter.folder, backbone=lm).eval()
    _ATTACHED[lm] = (drafter.folder, model)
    return model

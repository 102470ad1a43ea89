"""Draft exits shipped with the package, found by the model they were tuned for.

A shipped drafter is a folder under ``exitwise/assets/drafters/`` holding what
``MultiExitModel.save_pretrained`` writes for the exits alone (``exit_config.json``,
``exit_heads.safetensors``) and ``drafter.json``: the model's fingerprint, the decoding options
it was measured best with (exit layer, draft length, n-gram order) and where it came from (the
command that tuned it, its held-out agreement). Each is produced by a committed script
(``benchmarks/ship_drafter.py``) from exits tuned on the model's own answers.

:func:`find_drafter` matches a decoder by its fingerprint: architecture, depth, widths, a
checksum of a few rows of its token embedding and a hash of a strided sample of every
parameter rounded to bfloat16 (and one rounded to float16), so a drafter is only ever used on
the weights it was tuned for, loaded in float32, bfloat16 or float16. A fine-tuned variant of
the same architecture does not match unless no sampled weight moved by more than its
bfloat16 rounding.
Drafting stays lossless whatever the drafter: it only proposes tokens the full model verifies.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import parameter_samples, weights_fingerprint

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "drafters"
DRAFTER_FILE = "drafter.json"
_ROWS = 16  # embedding rows summed into the checksum (first and last)
_SAMPLE = 4096  # values hashed per parameter (strided)


def weights_hash(model: torch.nn.Module, dtype: torch.dtype) -> str:
    """SHA-256 of a strided sample (about ``_SAMPLE`` values) of every parameter of
    ``model``, rounded to ``dtype`` (a 16-bit float): equal for the same weights loaded in
    float32 or in that dtype, different once a sampled weight moves past its rounding."""
    digest = hashlib.sha256()
    for p, sample in zip(model.parameters(), parameter_samples(model, _SAMPLE)):
        digest.update(str(tuple(p.shape)).encode())
        digest.update(sample.to(dtype).cpu().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(backbone: Any) -> dict[str, Any]:
    """What identifies a decoder's weights: model type, layers, hidden and vocab sizes, sums
    of the first and last embedding rows (float64), and :func:`weights_hash` in bfloat16 and
    float16."""
    weight = backbone.model.get_input_embeddings().weight.detach()
    return {
        "model_type": backbone.describe().get("model_type"),
        "num_layers": int(backbone.num_layers), "hidden_size": int(backbone.hidden_size),
        "vocab_size": int(backbone.vocab_size),
        "embed_head_sum": float(weight[:_ROWS].double().sum()),
        "embed_tail_abs_sum": float(weight[-_ROWS:].double().abs().sum()),
        "weights_bf16_sha256": weights_hash(backbone.model, torch.bfloat16),
        "weights_f16_sha256": weights_hash(backbone.model, torch.float16),
    }


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same weights: the shapes equal, and one of the two weight hashes (a float32 model
    and its bfloat16 / float16 copies share one). The embedding sums are kept for reading,
    not compared: a 16-bit copy's differ from the float32 model's."""
    for key in ("model_type", "num_layers", "hidden_size", "vocab_size"):
        if a.get(key) != b.get(key):
            return False
    hashes = ("weights_bf16_sha256", "weights_f16_sha256")
    return any(a.get(k) is not None and a.get(k) == b.get(k) for k in hashes)


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


# model (the HF causal LM) -> (what its lookup depended on, the drafter found or None): the
# fingerprint hashes every parameter (tens of ms for SmolLM2), so each ``generate`` call that
# looks for a drafter reuses the answer while the weights stay where they were with the same
# quick checksum (a few values per parameter: writes through ``.data`` and tensors made
# under inference mode have no reliable version counter to go by).
_FOUND: "weakref.WeakKeyDictionary[Any, tuple[Any, ShippedDrafter | None]]" = \
    weakref.WeakKeyDictionary()
_QUICK = 64  # values per parameter in the cache's checksum


def _lookup_key(lm: torch.nn.Module, root: Path | None) -> tuple[Any, ...]:
    return (str(ASSETS if root is None else root), *weights_fingerprint(lm, _QUICK),
            tuple((p.data_ptr(), p.dtype, p.device) for p in lm.parameters()))


def find_drafter(backbone: Any, root: Path | None = None) -> ShippedDrafter | None:
    """The shipped drafter tuned for exactly this decoder's weights, or None (also for
    weights not loaded yet: parameters on the ``meta`` device)."""
    lm = backbone.model
    if any(p.device.type == "meta" for p in lm.parameters()):
        return None
    key = _lookup_key(lm, root)
    cached = _FOUND.get(lm)
    if cached is not None and cached[0] == key:
        return cached[1]
    mine = fingerprint(backbone)
    found = next((d for d in shipped_drafters(root)
                  if same_model(d.meta.get("fingerprint", {}), mine)), None)
    _FOUND[lm] = (key, found)
    return found


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

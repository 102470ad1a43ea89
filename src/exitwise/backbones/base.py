"""The backbone contract: a network seen as a stack of blocks.

An adapter turns a model into ``start(inputs) -> state``, ``step(i, state) -> state``,
``features(state) -> what a head reads`` and ``keep(state, rows) -> smaller batch``. The
executor in :mod:`exitwise.runtime` and the multi-exit model only ever talk to this contract,
so a new family is one adapter, never a copied ``forward``.

``state.hidden`` always has the batch on dim 0. Everything that is per row lives in
``state.rows`` (indexed by :meth:`keep`); everything shared by all rows (relative position
tables, the mask in the layer's own format) is rebuilt by :meth:`refresh` whenever the batch
changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError


def resolve_path(root: Any, path: str | None) -> Any:
    """The object at a dotted path under ``root`` (``a.b.0`` indexes a Sequential or
    ModuleList; ``a|b`` tries each alternative); None when absent or ``path`` is None."""
    if path is None:
        return None
    for option in path.split("|"):
        obj = root
        for part in option.split("."):
            if part.isdigit():  # an index into a Sequential / ModuleList
                try:
                    obj = obj[int(part)]
                except (IndexError, TypeError, KeyError):
                    obj = None
            else:
                obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


@dataclass
class OwnClassifier:
    """A model's own task classifier, as an adapter reports it (``own_classifier()``):
    ``kind``, how the model applies it after the blocks (see :mod:`exitwise.heads.native`);
    ``modules``, the model's own modules that tail calls (shared, never copied);
    ``num_labels``, its outputs; ``label_names``, its class names when the model has some."""

    kind: str
    modules: dict[str, nn.Module]
    num_labels: int
    label_names: list[str] | None = None


def hf_label_names(config: Any, num_labels: int) -> list[str] | None:
    """A Hugging Face config's class names (``id2label``), unless they are the generic
    ``LABEL_i`` placeholders."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(num_labels)]
    if not all(names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names if len(set(names)) == len(names) else None


@dataclass
class BackboneState:
    """What flows between blocks.

    hidden: (B, ...) the current activations (B, T, H) for token models.
    mask:   (B, T) 1 for real tokens, 0 for padding; None for non-token models.
    rows:   other per-row tensors (batch on dim 0), kept in step with ``hidden``.
    shared: values that depend only on the batch's shape, rebuilt after ``keep``.
    """

    hidden: torch.Tensor
    mask: torch.Tensor | None = None
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])


class Backbone(nn.Module):
    """Base class of all adapters. Subclasses set ``num_layers`` and implement the four calls."""

    num_layers: int
    family: str = "generic"

    def start(self, **inputs: Any) -> BackboneState:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, i: int, state: BackboneState) -> BackboneState:  # pragma: no cover
        raise NotImplementedError

    def features(self, state: BackboneState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a head reads after a block: (hidden, mask)."""
        return state.hidden, state.mask

    def feature_positions(self, layer: int, state: BackboneState) -> int | None:
        """Positions a head after ``layer`` (1-based) reads when ``features`` gives no mask:
        H x W of a feature map (what a head that works per position pays for), None for
        backbones whose features always come with a mask or are one vector per row."""
        return None

    def feature_dim(self, layer: int) -> int:  # pragma: no cover - abstract
        """Width of ``features`` after ``layer`` (1-based depth)."""
        raise NotImplementedError

    def own_classifier(self) -> OwnClassifier | None:
        """The wrapped model's own task classifier, if it has one (it then becomes the final
        exit, unchanged). Default: none."""
        return None

    def refresh(self, state: BackboneState) -> BackboneState:
        """Rebuild ``state.shared`` after the batch changed. Default: nothing shared."""
        return state

    def keep(self, state: BackboneState, rows: torch.Tensor) -> BackboneState:
        """Return the state restricted to ``rows`` (a LongTensor of row indices)."""
        new = BackboneState(
            hidden=state.hidden.index_select(0, rows),
            mask=None if state.mask is None else state.mask.index_select(0, rows),
            rows={k: v.index_select(0, rows) for k, v in state.rows.items()},
            shared={},
        )
        return self.refresh(new)

    def step_rows(self, i: int, state: BackboneState, run: torch.Tensor) -> BackboneState:
        """Block ``i`` on the rows where ``run`` (B,) bool is True only; the other rows keep
        their state and are not computed (layer skipping). The running rows go through
        :meth:`keep` and :meth:`step` as a smaller batch and are written back; when ``keep``
        trimmed trailing positions (padding none of them needs), their results fill the
        leading positions and the trimmed ones keep their old values."""
        n = int(run.sum())
        if n == state.batch_size:
            return self.step(i, state)
        if n == 0:
            return state
        rows = run.nonzero().squeeze(1)
        sub = self.step(i, self.keep(state, rows))

        def put(full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
            if part.dim() != full.dim() or any(p > f for p, f in zip(part.shape[1:],
                                                                      full.shape[1:])):
                raise InputError(
                    f"block {i} changes the state's shape ({tuple(full.shape[1:])} -> "
                    f"{tuple(part.shape[1:])}); only shape-keeping blocks can be skipped"
                )
            out = full.clone()  # not in place: autograd may still need ``full``
            out[(rows, *(slice(0, s) for s in part.shape[1:]))] = part.to(full.dtype)
            return out

        state.hidden = put(state.hidden, sub.hidden)
        # Per-row tensors the block consumed (gone from ``sub``) are dropped for all rows.
        state.rows = {k: put(v, sub.rows[k]) for k, v in state.rows.items() if k in sub.rows}
        return state

    # -- cost model -------------------------------------------------------------------------
    def layer_flops(self, i: int, state: BackboneState) -> torch.Tensor:
        """FLOPs block ``i`` spends on each row, (B,) float64, counting real tokens only."""
        raise NotImplementedError  # pragma: no cover

    def start_flops(self, state: BackboneState) -> torch.Tensor:
        """FLOPs spent in ``start`` (embeddings, stem), (B,)."""
        return torch.zeros(state.batch_size, dtype=torch.float64)

    def describe(self) -> dict[str, Any]:
        """JSON-able facts saved with exit heads, checked again at load time."""
        return {"family": self.family, "num_layers": self.num_layers}

    @staticmethod
    def check_batch(batch_size: int) -> None:
        if batch_size == 0:
            raise InputError("the batch is empty: give at least one row")


def reference_output(backbone: Backbone, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The wrapped model's *own* forward (not the adapter's stepping): (final hidden, mask).

    Used as ground truth for the never-exit invariant and as the full-depth baseline in
    benchmarks.
    """
    own = getattr(backbone, "reference", None)
    if own is None:
        raise NotImplementedError(f"{type(backbone).__name__} has no reference forward")
    return own(**inputs)

"""Cached all-exit logits: one forward pass over a dataset, then any policy offline.

An :class:`ExitLogitsCache` holds, for N examples, every exit's raw logits, the labels and the
FLOPs each example would cost if it left at each exit. :func:`~exitwise.analysis.replay`
runs a policy on it exactly as the real executor would, so calibration sweeps and curves
need no further model passes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from ..data.classes import check_class_names
from ..errors import DataError, InputError
from ..modes import eval_mode
from ..policies.ztw import ZTWPolicy, ztw_ensemble
from ..runtime.flops import exit_cost_table, full_depth_cost
from ..runtime.online import split_batch
from .scores import REGRESSION, task_of

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

CACHE_FORMAT = "exitwise-exit-logits"
CACHE_VERSION = 1
UNKNOWN_LABEL = -1


def _plain(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``dtype`` usable with autograd (inference-mode tensors are copied)."""
    t = torch.as_tensor(value).detach().to("cpu", dtype)
    return t.clone() if t.is_inference() else t


@dataclass
class ExitLogitsCache:
    """Every exit's logits for N examples.

    logits:      (N, E, C) float32, raw (untempered) logits of every exit, shallowest first
                 (C == 1: a regression model's predicted values).
    labels:      (N,) long class ids, -1 where unknown; for regression (C == 1) float32
                 targets, nan where unknown.
    costs:       (N, E) float64, FLOPs of leaving at exit k (blocks, embeddings and every head
                 run up to k), from :func:`exitwise.runtime.flops.exit_cost_table`.
    full_cost:   (N,) float64, FLOPs of the plain full-depth model (no exit heads but the final).
    exit_layers: the E depths (1-based) carrying the exits.
    meta:        free JSON-able notes (model name, split ...), saved with the cache.
    scores:      (N, E) float32 learned exit scores (a model with an exit scorer,
                 :mod:`exitwise.heads.scorer`), read by policies with ``uses_scores``; else None.
    skipped:     (N, E) bool for a model with a skip gate (:mod:`exitwise.heads.skip_gate`):
                 True where the row skipped the block exit k sits on, so it is not offered
                 exit k (the replay masks that decision, as the executor does). The logits and
                 costs are those of the gated run (the gates are deterministic at inference).
                 None for a model without a gate.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    costs: torch.Tensor
    full_cost: torch.Tensor
    exit_layers: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = None
    skipped: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.logits = _plain(self.logits, torch.float32)
        regression = self.logits.dim() == 3 and self.logits.shape[2] == 1
        self.labels = _plain(self.labels, torch.float32 if regression else torch.long)
        self.costs = _plain(self.costs, torch.float64)
        self.full_cost = _plain(self.full_cost, torch.float64)
        self.exit_layers = [int(d) for d in self.exit_layers]
        if self.logits.dim() != 3:
            raise InputError(f"cache logits must be (N, E, C); got {tuple(self.logits.shape)}")
        n, e, _ = self.logits.shape
        if len(self.exit_layers) != e:
            raise InputError(f"{len(self.exit_layers)} exit layers for {e} exits in the logits")
        expected = {"labels": (n,), "costs": (n, e), "full_cost": (n,)}
        if self.scores is not None:
            self.scores = _plain(self.scores, torch.float32)
            expected["scores"] = (n, e)
        if self.skipped is not None:
            self.skipped = _plain(self.skipped, torch.bool)
            expected["skipped"] = (n, e)
        for name, shape in expected.items():
            have = tuple(getattr(self, name).shape)
            if have != shape:
                raise InputError(f"cache {name} has shape {have}, expected {shape}")

    # -- basic facts ------------------------------------------------------------------------
    @property
    def num_examples(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_exits(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[2])

    @property
    def task(self) -> str:
        """"classification", or "regression" when the exits output one value."""
        return task_of(self.num_classes)

    @property
    def labeled(self) -> torch.Tensor:
        """(N,) bool: rows whose label is known."""
        if self.task == REGRESSION:
            return ~torch.isnan(self.labels)
        return self.labels >= 0

    def __len__(self) -> int:
        return self.num_examples

    def check(self, need_labels: bool = False) -> None:
        """Raise :class:`InputError` if the cache cannot be used for analysis or calibration:
        no rows, non-finite logits or costs, or (``need_labels``) any unknown label."""
        if self.num_examples == 0:
            raise InputError("the exit-logits cache is empty: collect it on at least one example")
        if not bool(torch.isfinite(self.logits).all()):
            bad = int((~torch.isfinite(self.logits)).any(-1).any(-1).sum())
            raise InputError(f"the cache has NaN or inf logits in {bad} rows; the model is broken")
        if not bool(torch.isfinite(self.costs).all() and torch.isfinite(self.full_cost).all()):
            raise InputError("the cache has NaN or inf costs")
        if self.task != REGRESSION and self.num_examples:  # -1 marks an unknown label
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < -1 or high >= self.num_classes:
                raise InputError(
                    f"labels must be class ids in [0, {self.num_classes}) or -1 (unknown); "
                    f"the cache has {low if low < -1 else high}")
        if need_labels:
            missing = int((~self.labeled).sum())
            if missing:
                raise InputError(
                    f"{missing} of {self.num_examples} cached rows have no label; "
                    "calibration and accuracy need a labeled held-out set"
                )
            if self.task != REGRESSION and int(self.labels.max()) >= self.num_classes:
                raise InputError(
                    f"labels go up to {int(self.labels.max())} but the exits have "
                    f"{self.num_classes} classes"
                )

    def subset(self, rows: torch.Tensor | list[int]) -> "ExitLogitsCache":
        """The cache restricted to ``rows`` (indices or a (N,) bool mask)."""
        idx = torch.as_tensor(rows)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(1)
        idx = idx.long()
        return ExitLogitsCache(
            self.logits[idx], self.labels[idx], self.costs[idx], self.full_cost[idx],
            list(self.exit_layers), dict(self.meta),
            None if self.scores is None else self.scores[idx],
            None if self.skipped is None else self.skipped[idx],
        )

    @classmethod
    def concat(cls, caches: list["ExitLogitsCache"]) -> "ExitLogitsCache":
        """Stack caches of the same model (same exits and classes) row-wise."""
        if not caches:
            raise InputError("nothing to concatenate")
        layers = caches[0].exit_layers
        if any(c.exit_layers != layers for c in caches):
            raise InputError("caches come from models with different exits")
        scored = [c.scores is not None for c in caches]
        if any(scored) and not all(scored):
            raise InputError("some caches have exit scores and others not")
        gated = [c.skipped is not None for c in caches]
        if any(gated) and not all(gated):
            raise InputError("some caches come from a gated model and others not")
        return cls(
            torch.cat([c.logits for c in caches]),
            torch.cat([c.labels for c in caches]),
            torch.cat([c.costs for c in caches]),
            torch.cat([c.full_cost for c in caches]),
            list(layers),
            dict(caches[0].meta),
            torch.cat([c.scores for c in caches]) if all(scored) else None,
            torch.cat([c.skipped for c in caches]) if all(gated) else None,
        )

    # -- persistence (safetensors, no pickle) -----------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file; exit layers and ``meta`` go in its JSON metadata."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "logits": self.logits.contiguous(),
            "labels": self.labels.contiguous(),
            "costs": self.costs.contiguous(),
            "full_cost": self.full_cost.contiguous(),
        }
        if self.scores is not None:
            tensors["scores"] = self.scores.contiguous()
        if self.skipped is not None:
            tensors["skipped"] = self.skipped.contiguous()
        header = {
            "format": CACHE_FORMAT,
            "version": str(CACHE_VERSION),
            "exit_layers": json.dumps(self.exit_layers),
            "meta": json.dumps(self.meta),
        }
        save_file(tensors, str(out), metadata=header)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "ExitLogitsCache":
        src = Path(path)
        if not src.is_file():
            raise DataError(f"{src} not found")
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != CACHE_FORMAT:
            raise DataError(f"{src} is not an exitwise exit-logits cache")
        tensors = load_file(str(src))
        return cls(
            tensors["logits"], tensors["labels"], tensors["costs"], tensors["full_cost"],
            json.loads(header["exit_layers"]), json.loads(header.get("meta", "{}")),
            tensors.get("scores"), tensors.get("skipped"),
        )


# -- collection ------------------------------------------------------------------------------
def batch_labels(labels: Any, logits: torch.Tensor) -> torch.Tensor:
    """(B,) CPU labels of a batch whose outputs are ``logits`` (B, ..., C): long class ids, or
    float targets for regression (C == 1); unknown (None) -> -1 / nan."""
    b = logits.shape[0]
    regression = logits.shape[-1] == 1
    if labels is None:
        labels = torch.full((b,), math.nan if regression else UNKNOWN_LABEL)
    labels = torch.as_tensor(labels).cpu()
    labels = labels.float() if regression else labels.long()
    if labels.shape != (b,):
        raise InputError(f"batch labels have shape {tuple(labels.shape)} for {b} rows")
    return labels


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _batch_exit_logits(model: "MultiExitModel", inputs: dict[str, Any]):
    """One pass over a batch: (logits (B, E, C), costs (B, E), full cost (B,), scores (B, E)
    or None without an exit scorer, skipped (B, E) bool or None without a skip gate).

    The cost tables are read from the state right after ``start`` (they depend only on each
    row's real length, and on the blocks a gated row ran), then the blocks run with every head
    evaluated, as in ``forward``.
    """
    backbone = model.backbone
    state = backbone.start(**inputs)
    gated = model.gate is not None
    first = replace(state, rows=dict(state.rows), shared=dict(state.shared)) if gated else state
    ran_blocks = torch.ones(state.batch_size, backbone.num_layers, dtype=torch.bool)
    skipped: list[torch.Tensor] = []
    costs = None if gated else exit_cost_table(model, state)
    full = full_depth_cost(model, state)
    logits: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    previous: torch.Tensor | None = None  # raw logits of the last exit, for cascade heads
    past: list[torch.Tensor] = []  # states of the earlier exits, for past-future heads
    for i in range(backbone.num_layers):
        state, ran = model.block_step(i, state)
        if ran is not None:
            ran_blocks[:, i] = ran.cpu()
        k = model.exit_lookup.get(i + 1)
        if k is not None:
            skipped.append(~ran_blocks[:, i])
            hidden, mask = backbone.features(state)
            if model.scorer is not None:
                previous, score = model.exit_score(k, hidden, mask, previous, past)
                scores.append(score.float())
            else:
                previous = model.head_logits(k, hidden, mask, previous, past)
            logits.append(previous.float())
    if gated:
        costs = exit_cost_table(model, first, ran_blocks)
    return (torch.stack(logits, dim=1), costs, full,
            torch.stack(scores, dim=1) if scores else None,
            torch.stack(skipped, dim=1) if gated else None)


def collect_exit_logits(
    model: "MultiExitModel",
    dataloader: Iterable[Any],
    progress: bool = True,
    device: torch.device | str | None = None,
    meta: dict[str, Any] | None = None,
) -> ExitLogitsCache:
    """Run ``model`` once over ``dataloader`` and cache every exit's raw logits and costs.

    dataloader: any iterable of batches (dicts with input_ids/attention_mask/labels, or
        ``(inputs, labels)`` tuples). Rows without labels get -1 (nan for regression).
    device: where to run; defaults to the model's parameters' device.
    The model is put in eval mode for the pass and restored afterwards.
    """
    check_class_names(dataloader, getattr(model.config, "label_names", None), "given")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "costs": [], "full": [],
                                            "scores": [], "skipped": []}
    with eval_mode(model):
        total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore
        from tqdm.auto import tqdm

        bar = tqdm(dataloader, total=total, disable=not progress, desc="caching exit logits")
        with torch.inference_mode():
            for batch in bar:
                inputs, labels = split_batch(batch)
                logits, costs, full, scores, skipped = _batch_exit_logits(
                    model, _to_device(inputs, device))
                parts["logits"].append(logits.cpu())
                parts["labels"].append(batch_labels(labels, logits))
                parts["costs"].append(costs.cpu())
                parts["full"].append(full.cpu())
                if scores is not None:
                    parts["scores"].append(scores.cpu())
                if skipped is not None:
                    parts["skipped"].append(skipped)
    if not parts["logits"]:
        raise InputError("the dataloader yielded no batches")
    return ExitLogitsCache(
        logits=torch.cat(parts["logits"]),
        labels=torch.cat(parts["labels"]),
        costs=torch.cat(parts["costs"]),
        full_cost=torch.cat(parts["full"]),
        exit_layers=list(model.exit_layers),
        # which scorer the scores come from, so that a policy reading another's is refused
        meta={**({"scorer": model.scorer.registered_name} if parts["scores"] else {}),
              **(meta or {})},
        scores=torch.cat(parts["scores"]) if parts["scores"] else None,
        skipped=torch.cat(parts["skipped"]) if parts["skipped"] else None,
    )


def ztw_cache(cache: ExitLogitsCache, policy: ZTWPolicy, temperatures: Any = None) -> ExitLogitsCache:
    """A copy of an :class:`~exitwise.analysis.ExitLogitsCache` whose logits are the ZTW
    ensemble's log-probabilities (temperatures already applied: replay it with none).

    Replaying ``confidence`` at the same threshold on it makes the same decisions as ``policy``
    on the original cache (up to float round-off), and its predictions are the ensemble's.
    """
    logits = ztw_ensemble(cache.logits, policy.params["weights"], policy.params["biases"],
                          temperatures)
    return ExitLogitsCache(logits, cache.labels, cache.costs, cache.full_cost,
                           list(cache.exit_layers), {**cache.meta, "ztw_ensemble": True},
                           cache.scores, cache.skipped)

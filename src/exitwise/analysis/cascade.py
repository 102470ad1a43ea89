"""Offline analysis of a model cascade (:class:`exitwise.cascade.ModelCascade`): one pass of
every member over a dataset, then any policy replayed without running a model again.

The cache is an ordinary :class:`~exitwise.analysis.ExitLogitsCache` whose "exits" are the
members, so :func:`~exitwise.analysis.replay`, the calibration searches and the curves work on
it unchanged:

    logits[:, m]  member m's raw full-depth logits (``member.full_depth``);
    costs[:, m]   FLOPs of a row that leaves at member m: the full depth of members 0..m;
    full_cost     FLOPs of the last (largest) member alone: the plain model the cascade
                  replaces, so ``flops_speedup`` is the speed-up over it;
    exit_layers   blocks run when leaving at member m (members 0..m), e.g. [2, 8];
    meta          ``{"cascade": {"member_layers": [...]}}``.

    cache = collect_cascade_logits(cascade, heldout_loader)
    res = replay_cascade(0.9, cache, cascade)      # the decisions cascade.run(0.9, ...) makes
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..cascade import ModelCascade
from ..errors import InputError
from ..modes import eval_mode
from ..runtime.cascade import PolicySpec, cascade_policy
from ..runtime.flops import full_depth_cost
from ..runtime.online import split_batch
from .cache import ExitLogitsCache, batch_labels
from .replay import ReplayResult, replay


def _inputs_and_labels(batch: Any) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A dict batch -> (member inputs, labels or None)."""
    if not isinstance(batch, Mapping):
        raise InputError(f"a cascade reads dict batches (input_ids, attention_mask, labels); "
                         f"got {type(batch).__name__}")
    return split_batch(batch)


def collect_cascade_logits(
    cascade: ModelCascade,
    dataloader: Iterable[Any],
    device: torch.device | str | None = None,
    meta: dict[str, Any] | None = None,
) -> ExitLogitsCache:
    """Run every member once over ``dataloader`` (dict batches) and cache their full-depth
    logits and costs (see the module docstring). Members are put in eval mode for the pass
    and restored afterwards."""
    if device is None:
        param = next(cascade.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    parts: dict[str, list[torch.Tensor]] = {"logits": [], "labels": [], "costs": [], "full": []}
    with eval_mode(cascade):
        with torch.inference_mode():
            for batch in dataloader:
                inputs, labels = _inputs_and_labels(batch)
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in inputs.items()}
                logits, costs = [], []
                for member in cascade.members:
                    logits.append(member.full_depth(**inputs).float().cpu())
                    state = member.backbone.start(**inputs)
                    costs.append(full_depth_cost(member, state).cpu())
                stacked = torch.stack(logits, dim=1)
                labels = batch_labels(labels, stacked)
                member_costs = torch.stack(costs, dim=1)
                parts["logits"].append(stacked)
                parts["labels"].append(labels)
                parts["costs"].append(member_costs.cumsum(dim=1))
                parts["full"].append(member_costs[:, -1])
    if not parts["logits"]:
        raise InputError("the dataloader yielded no batches")
    return ExitLogitsCache(
        logits=torch.cat(parts["logits"]),
        labels=torch.cat(parts["labels"]),
        costs=torch.cat(parts["costs"]),
        full_cost=torch.cat(parts["full"]),
        exit_layers=cascade.cumulative_layers,
        meta={**(meta or {}), "cascade": {"member_layers": cascade.member_layers}},
    )


def replay_cascade(
    policy: PolicySpec,
    cache: ExitLogitsCache,
    cascade: ModelCascade | torch.Tensor | Sequence[float] | None = None,
) -> ReplayResult:
    """Replay ``policy`` (an ExitPolicy, a threshold or one threshold per member boundary, as
    :meth:`ModelCascade.run` takes) on a cascade cache.

    cascade: the cascade (its members' temperatures are used, as ``run`` uses them, and its
        stored policy when ``policy`` is None), or (M,) temperatures, or None (no scaling).
    """
    if policy is None and isinstance(cascade, ModelCascade):
        policy = cascade.policy
    chosen = cascade_policy(policy, cache.num_exits)
    temps = cascade.temperatures if isinstance(cascade, ModelCascade) else cascade
    return replay(chosen, cache, temps)


__all__ = ["collect_cascade_logits", "replay_cascade"]

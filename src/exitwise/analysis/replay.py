"""Offline replay: run a policy on cached logits exactly as the real executor would.

The loop below mirrors :func:`exitwise.runtime.run_early_exit` step for step: at exit k it
scales the still-active rows' logits by ``1 / temperature[k]`` (only when it is not 1, as the
executor does), asks ``policy.decide``, removes the rows that exit, shrinks the policy state
with ``policy.keep`` and forces everyone out at the last exit. Same calls, same order, same
state: so replay and runtime agree on every decision (tested for every registered policy).
A cache from a model with a skip gate says which rows skipped the block each exit sits on
(``cache.skipped``); those rows are not offered that exit, as in the executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..policies.base import ExitPolicy
from ..temperatures import temperature_list
from .cache import ExitLogitsCache
from .scores import REGRESSION, predictions_of, score


@dataclass
class ReplayResult:
    """What a policy does on a cache of N examples with E exits.

    exit_index:     (N,) long, the exit each row left at.
    exit_layer:     (N,) long, its depth (blocks run).
    predictions:    (N,) long, argmax of the logits at that exit (regression: (N,) float, the
                    predicted value).
    costs:          (N,) float64, FLOPs each row spent (cache.costs at its exit).
    exit_histogram: (E,) long, rows per exit.
    accuracy:       fraction of labeled rows predicted right (nan if none is labeled, and for
                    regression).
    score:          the task metric: ``accuracy``, or Pearson's r for regression.
    mean_layers:    mean exit depth in blocks.
    mean_flops:     mean of ``costs``.
    flops_speedup:  mean full-depth cost / mean cost.
    relative_compute: 1 / flops_speedup (mean cost as a fraction of full depth).
    outputs:        (N, C) what each row returned, only for policies that change it
                    (``policy.transforms_output``, e.g. ZTW's ensemble); None otherwise (the
                    temperature-scaled cached logits at the exit).
    """

    exit_index: torch.Tensor
    exit_layer: torch.Tensor
    predictions: torch.Tensor
    costs: torch.Tensor
    exit_histogram: torch.Tensor
    accuracy: float
    mean_layers: float
    mean_flops: float
    flops_speedup: float
    relative_compute: float
    outputs: torch.Tensor | None = None
    score: float = float("nan")
    task: str = "classification"

    def metrics(self) -> dict[str, Any]:
        """The scalar metrics and the histogram, JSON-able."""
        return {
            "accuracy": self.accuracy,
            "score": self.score,
            "task": self.task,
            "mean_layers": self.mean_layers,
            "mean_flops": self.mean_flops,
            "flops_speedup": self.flops_speedup,
            "relative_compute": self.relative_compute,
            "exit_histogram": [int(v) for v in self.exit_histogram],
            "num_examples": int(self.exit_index.numel()),
        }


def replay(
    policy: ExitPolicy,
    cache: ExitLogitsCache,
    temperatures: torch.Tensor | Sequence[float] | None = None,
) -> ReplayResult:
    """Run ``policy`` on ``cache`` as the executor would run it on the same examples.

    temperatures: (E,) per-exit temperatures (e.g. ``model.temperatures``); None = 1.
    Policies with ``needs_labels`` (the oracle) get the cache's labels, which must be known.
    """
    cache.check(need_labels=policy.needs_labels)
    policy.check_task(cache.task)
    policy.check_scorer(cache.meta.get("scorer"), cache.scores is not None)
    n, num_exits = cache.num_examples, cache.num_exits
    temps = temperature_list(temperatures, num_exits)

    exit_index = torch.full((n,), -1, dtype=torch.long)
    active = torch.arange(n)
    labels = cache.labels if policy.needs_labels else None
    pstate = policy.init_state(n, "cpu")
    # Policies that change what a leaving row returns (ensembles) predict from that output.
    transforms = policy.transforms_output
    predictions = torch.full((n,), -1, dtype=torch.long)
    if cache.task == REGRESSION:
        predictions = predictions.float()
    outputs: torch.Tensor | None = None
    for k in range(num_exits):
        logits = cache.logits[active, k]
        if temps[k] != 1.0:
            logits = logits / temps[k]
        policy.check_logits(logits)
        emitted = policy.output_logits(k, num_exits, logits, pstate) if transforms else None
        if k == num_exits - 1:
            done = torch.ones(logits.shape[0], dtype=torch.bool)
        else:
            extra = {"scores": cache.scores[active, k]} if policy.uses_scores else {}
            done, pstate = policy.decide(k, num_exits, logits, pstate, labels, **extra)
            if cache.skipped is not None:  # a gated row that skipped this exit's block
                done = done & ~cache.skipped[active, k]
        if emitted is not None and outputs is None:
            outputs = torch.zeros(n, emitted.shape[-1], dtype=emitted.dtype)
        n_done = int(done.sum())
        if n_done == active.numel():
            exit_index[active] = k
            if emitted is not None:
                predictions[active] = predictions_of(emitted).to(predictions.dtype)
                outputs[active] = emitted
            break
        if n_done:
            leave = done.nonzero().squeeze(1)
            stay = (~done).nonzero().squeeze(1)
            exit_index[active[leave]] = k
            if emitted is not None:
                predictions[active[leave]] = predictions_of(emitted[leave]).to(
                    predictions.dtype)
                outputs[active[leave]] = emitted[leave]
            active = active[stay]
            pstate = policy.keep(pstate, stay)
            if labels is not None:
                labels = labels[stay]
    if bool((exit_index < 0).any()):  # pragma: no cover - the last exit takes everyone
        raise InputError("replay left rows without an exit")
    result = summarize(cache, exit_index, predictions if transforms else None)
    result.outputs = outputs
    return result


def summarize(
    cache: ExitLogitsCache, exit_index: torch.Tensor, predictions: torch.Tensor | None = None
) -> ReplayResult:
    """Metrics of a given exit assignment (N,) on ``cache``; ``predictions`` (N,) default to
    the argmax of each row's cached logits at its exit (the value, for regression)."""
    rows = torch.arange(cache.num_examples)
    if predictions is None:
        predictions = predictions_of(cache.logits[rows, exit_index])
    costs = cache.costs[rows, exit_index]
    layers = torch.tensor(cache.exit_layers, dtype=torch.long)[exit_index]
    labeled = cache.labeled
    task = cache.task
    value = score(predictions[labeled], cache.labels[labeled], task)
    accuracy = value if task != REGRESSION else float("nan")
    mean_flops = float(costs.mean())
    mean_full = float(cache.full_cost.mean())
    return ReplayResult(
        exit_index=exit_index,
        exit_layer=layers,
        predictions=predictions,
        costs=costs,
        exit_histogram=torch.bincount(exit_index, minlength=cache.num_exits),
        accuracy=accuracy,
        mean_layers=float(layers.double().mean()),
        mean_flops=mean_flops,
        flops_speedup=mean_full / mean_flops if mean_flops > 0 else float("inf"),
        relative_compute=mean_flops / mean_full if mean_full > 0 else float("nan"),
        score=value,
        task=task,
    )

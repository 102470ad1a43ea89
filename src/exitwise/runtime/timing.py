"""Honest wall-clock comparison: interleaved repetitions, medians, ratios.

Benchmarks on a shared, noisy machine compare configurations measured side by side in one
process. Each repetition runs every configuration once, in an order rotated per repetition so
that none always runs first (warm caches) or last; the reported figure is the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from ..errors import ConfigError
from ..policies.base import ExitPolicy
from .online import split_batch


def rotation(items: Sequence[Any], step: int) -> list[Any]:
    """``items`` rotated left by ``step``: step 0 keeps the order, step 1 starts with the
    second item ... so that over consecutive steps every item runs first equally often."""
    k = step % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
    tick: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, interleaved. ``tick`` is
    called after every call (warm-up included), outside the timed span: a progress bar."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            if tick is not None:
                tick()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in rotation(names, rep):
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
            if tick is not None:
                tick()
    return samples


def device_sync(model: Any) -> Callable[[], None]:
    """What waits for the model's device to finish: ``torch.cuda.synchronize`` on a GPU
    (kernels run asynchronously, so a sample would time their launches), nothing else."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if param is not None and param.is_cuda:
        device = param.device
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_speedups(
    model: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    policies: dict[str, ExitPolicy],
    repeats: int = 5,
    warmup: int = 1,
    progress: str | None = None,
) -> dict[str, Any]:
    """Wall-clock of the plain full-depth model vs. real early exit with each policy.

    The baseline is ``model.full_depth`` (the backbone's own forward + final classifier), not
    the executor with a never-exit policy, so the speed-up includes every cost exitwise adds
    (heads at every exit, policy decisions, batch shrinking).

    batches: dicts of backbone inputs, or any batch a data loader gives (``(images, labels)``
    pairs, dicts with labels): labels are set aside before timing.

    progress: a progress bar's label (None: no bar); it counts passes over ``batches``.

    Returns {"baseline": {...}, "<policy>": {"median_s", "samples_s", "speedup"}} where times
    are for one pass over all ``batches``.
    """
    if "baseline" in policies:
        raise ConfigError("'baseline' names the full-depth model here; give the policy "
                          "another name")
    batches = [split_batch(b)[0] for b in batches]
    sync = device_sync(model)

    def full() -> None:
        with torch.inference_mode():
            for b in batches:
                model.full_depth(**b)
        sync()

    def make(policy: ExitPolicy) -> Callable[[], None]:
        def run() -> None:
            for b in batches:
                model.early_exit(policy, count_flops=False, **b)
            sync()

        return run

    fns: dict[str, Callable[[], Any]] = {"baseline": full}
    fns.update({name: make(p) for name, p in policies.items()})
    from tqdm.auto import tqdm

    with tqdm(total=(warmup + repeats) * len(fns), desc=progress, leave=False,
              disable=progress is None) as bar:
        samples = time_interleaved(fns, repeats=repeats, warmup=warmup, tick=bar.update)
    base = statistics.median(samples["baseline"])
    out: dict[str, Any] = {}
    for name, s in samples.items():
        med = statistics.median(s)
        out[name] = {"median_s": med, "samples_s": s, "speedup": base / med if med > 0 else None}
    return out


def batched(items: Iterable[Any], size: int) -> list[list[Any]]:
    chunk: list[Any] = []
    out: list[list[Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            out.append(chunk)
            chunk = []
    if chunk:
        out.append(chunk)
    return out

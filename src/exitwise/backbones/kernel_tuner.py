"""Measuring which few-row kernel to use: the measured choices of ``kernels="auto"``.

:class:`KernelTuner` keeps, per machine, the per-shape decisions (the stock product against
each alternative -- streaming, and packed where oneDNN can pack the weight -- over all the
model's weights of one shape, at one row count) and the whole-pass decisions
(:meth:`KernelTuner.check_stack`, one forward pass of the whole model through a
:class:`StackProbe`, rerouted vs stock); both are paired, alternating measurements decided by
:func:`paired_choice`. How and where the products are rerouted is
:mod:`exitwise.backbones.kernels`, which explains the two stages.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..machine import machine_key
from ..paths import cache_root
from .packed import can_pack, forget_packed, packed_linear
from .streaming import streaming_linear

logger = logging.getLogger(__name__)


ALTERNATIVES = ("streaming", "packed")  # the kernels measured against the stock product


@dataclass
class KernelDecision:
    """One measured choice: reroute (``stream``) to the alternative ``kind`` or not, with the
    medians it rests on (ms per pass over every weight of the shape; ``streaming_ms`` is the
    alternative's) and the median of the paired alternative/stock ratios. For a whole-pass
    check ``kind`` is "stack" (the pass rerouted as decided per shape)."""

    stream: bool
    ratio: float
    stock_ms: float
    streaming_ms: float
    kind: str = "streaming"


def paired_choice(
    stock_s: Sequence[float], streaming_s: Sequence[float], margin: float,
    kind: str = "streaming",
) -> KernelDecision:
    """The rule of ``kernels="auto"``: times of the stock kernel and an alternative ``kind``
    taken in pairs (seconds, run back to back); reroute when the median of the paired ratios
    alternative/stock is below ``1 - margin``."""
    if not stock_s or len(stock_s) != len(streaming_s):
        raise ConfigError("paired_choice needs two equally long, non-empty lists of times")
    ratio = statistics.median(s / max(t, 1e-12) for t, s in zip(stock_s, streaming_s))
    return KernelDecision(
        stream=ratio < 1.0 - margin, ratio=ratio,
        stock_ms=1000 * statistics.median(stock_s),
        streaming_ms=1000 * statistics.median(streaming_s), kind=kind,
    )


def paired_times(
    first: Callable[[], float], second: Callable[[], float], repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds of ``first`` and ``second`` (each returns the seconds of one run), measured in
    ``repeats`` pairs after one untimed warm-up of each; which of the two goes first alternates,
    so drift favours neither. Fewer pairs (at least 3) when one pair takes over 0.2 s."""
    warm = first() + second()  # allocations, first-touch, lazily built state
    if warm >= 0.2:
        repeats = max(3, repeats // 2)
    a: list[float] = []
    b: list[float] = []
    for r in range(repeats):
        if r % 2:
            b.append(second())
            a.append(first())
        else:
            a.append(first())
            b.append(second())
    return a, b


class StackProbe(Protocol):
    """One forward pass of a whole model on ``rows`` new rows, timed: ``probe(rows)`` returns
    the seconds the pass took (set-up it needs, such as copying a cache, is not counted).
    ``key`` names the model (architecture and shapes), so a verdict is reused only for it.
    For a ``per_call`` scope the pass is rerouted the way decoding reroutes it, through
    :func:`~exitwise.backbones.kernels.routed` (a pass that never calls it is never rerouted
    there, so its verdict is "stock")."""

    key: str

    def __call__(self, rows: int) -> float: ...


def shape_key(weights: Sequence[torch.Tensor], rows: int) -> str:
    """``dtype:OUTxIN:nWEIGHTS:rROWS``: the key of one per-shape decision."""
    w = weights[0]
    dtype = str(w.dtype).replace("torch.", "")
    return f"{dtype}:{w.shape[0]}x{w.shape[1]}:n{len(weights)}:r{rows}"


def stack_key(probe: StackProbe, rows: int, views: bool = False) -> str:
    """``stack:<probe.key>:r<rows>``: the key of one whole-pass verdict, rerouted by
    interception; ``stack:views:...`` when rerouted through few-row views (the mechanisms
    cost differently, so each has its own verdict)."""
    return f"stack:{'views:' if views else ''}{probe.key}:r{rows}"


class KernelTuner:
    """Measured few-row kernel choices for this machine (see module doc); thread-safe.

    path: the JSON file that keeps measurements across runs (None: this process only).
    margin: an alternative must be at least this much faster (median paired ratio < 1 - margin).
    alternatives: the kernels measured against the stock product (packed only where
        :func:`~exitwise.backbones.packed.can_pack`).
    repeats: timed pairs per measurement (fewer for a pass that takes longer than 0.1 s).
    """

    def __init__(
        self, path: str | Path | None = None, margin: float = 0.05, repeats: int = 9,
        alternatives: Sequence[str] = ALTERNATIVES,
    ) -> None:
        if not 0.0 <= margin < 1.0:
            raise ConfigError(f"margin must be in [0, 1); got {margin!r}")
        if not alternatives or any(a not in ALTERNATIVES for a in alternatives):
            raise ConfigError(f"alternatives must be some of {ALTERNATIVES}; got {alternatives!r}")
        self.alternatives = tuple(alternatives)
        if not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"repeats must be an int >= 1; got {repeats!r}")
        self.path = None if path is None else Path(path)
        self.margin = margin
        self.repeats = repeats
        # re-entrant: a whole-pass check (check_stack) runs rerouted products, which ask
        # decide() for their (already measured) choice while the check holds the lock
        self._lock = threading.RLock()
        self._memo: dict[str, dict[str, KernelDecision]] = {}
        self._verdicts: dict[tuple, bool] = {}
        self._loaded = False
        self._told = False

    # -- the decisions ----------------------------------------------------------------------
    def decide(self, weights: Sequence[torch.Tensor], rows: int) -> KernelDecision:
        """The choice for a product of ``rows`` rows with each of ``weights`` (all one shape
        and dtype), measured now if this machine has never measured it."""
        return self._kept_or_measured(shape_key(weights, rows),
                                      lambda: self._measure(weights, rows))

    def any_stream(self, groups: Sequence[Sequence[torch.Tensor]], max_rows: int) -> bool:
        """Whether any of these weight groups streams at any row count 1..``max_rows`` on this
        machine (each measured now if never measured). When none does, a caller need not
        reroute products at all: rerouting itself costs a Python call per operation, which on
        a small model outweighs what a few-row product could gain."""
        keys = tuple(sorted(shape_key(g, r) for g in groups for r in range(1, max_rows + 1)))
        memo_key = (machine_key(), keys)
        known = self._verdicts.get(memo_key)
        if known is None:
            self._told = False  # another model's shapes: its first measurement is announced
            known = any(self.decide(g, r).stream for g in groups
                        for r in range(1, max_rows + 1))
            self._verdicts[memo_key] = known
        return known

    def check_stack(
        self, probe: StackProbe, rows: int, routed: Callable[[], float],
        stock: Callable[[], float] | None = None, views: bool = False,
    ) -> KernelDecision:
        """Whether rerouting pays for a whole forward pass of ``probe``'s model at ``rows``
        rows: ``stock()`` (default ``probe(rows)``) against ``routed()`` (the same pass
        rerouted; ``views``: through few-row views), paired; measured once per machine and
        kept like the per-shape choices."""
        base = stock or (lambda: probe(rows))
        return self._kept_or_measured(stack_key(probe, rows, views),
                                      lambda: self._measure_stack(base, routed))

    def _kept_or_measured(self, key: str, measure: Callable[[], KernelDecision]) -> KernelDecision:
        """This machine's decision for ``key``, from memory or the file, else ``measure()``d
        now and kept."""
        machine = machine_key()
        with self._lock:
            self._load()
            known = self._memo.setdefault(machine, {}).get(key)
            if known is not None:
                return known
            if not self._told:
                # a first generate() on a new machine / model pauses here: say why, once,
                # rather than look many times slower than HF
                self._told = True
                logger.warning(
                    "exitwise: timing few-row kernels for this machine and model once (kept "
                    "in %s; kernels='stock' skips it)", self.path or "memory")
            decision = measure()
            self._memo[machine][key] = decision
            self._save(machine, key, decision)
        logger.info("kernels %s on %s: %s", key, machine, decision)
        return decision

    def decisions(self) -> dict[str, KernelDecision]:
        """This machine's measured choices, by ``dtype:OUTxIN:nWEIGHTS:rROWS``."""
        with self._lock:
            self._load()
            return dict(self._memo.get(machine_key(), {}))

    def clear(self) -> None:
        """Forget this machine's measurements (also in the file)."""
        machine = machine_key()
        with self._lock:
            self._load()
            self._memo.pop(machine, None)
            if self.path is not None and self.path.is_file():
                data = self._read()
                data.get("machines", {}).pop(machine, None)
                self._write(data)

    # -- measuring --------------------------------------------------------------------------
    @torch.inference_mode()
    def _measure(self, weights: Sequence[torch.Tensor], rows: int) -> KernelDecision:
        # A generator of its own: measuring must not move the user's random stream.
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, weights[0].shape[1], generator=gen).to(weights[0].dtype)

        def stock() -> float:
            t0 = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            return time.perf_counter() - t0

        def timed(kernel: Callable[..., torch.Tensor]) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                for w in weights:
                    kernel(x, w)
                return time.perf_counter() - t0

            return run

        kernels = {"streaming": streaming_linear, "packed": packed_linear}
        best = None
        for kind in self.alternatives:
            if kind == "packed" and not all(can_pack(w) for w in weights):
                continue
            a, b = paired_times(stock, timed(kernels[kind]), self.repeats)
            d = paired_choice(a, b, self.margin, kind=kind)
            if best is None or d.ratio < best.ratio:
                best = d
        if best is None or not (best.stream and best.kind == "packed"):
            forget_packed(weights)  # measured but not chosen: free the copies
        if best is None:  # no alternative applies to these weights
            return KernelDecision(False, float("inf"), 0.0, 0.0, kind="none")
        return best

    @torch.inference_mode()
    def _measure_stack(
        self, stock: Callable[[], float], routed: Callable[[], float]
    ) -> KernelDecision:
        # Whole passes are long: 5 pairs at most (each a paired ratio, so drift cancels).
        a, b = paired_times(stock, routed, min(self.repeats, 5))
        return paired_choice(a, b, self.margin, kind="stack")

    # -- the file ---------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # missing or damaged: measure again

    def _write(self, data: dict[str, Any]) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # whole file at once
        except OSError as err:  # a read-only home must not stop decoding
            logger.warning("could not keep kernel timings in %s: %s", self.path, err)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.path is None:
            return
        for machine, entries in self._read().get("machines", {}).items():
            for key, value in entries.items():
                if not isinstance(value, dict) or "kind" not in value:
                    continue  # measured before packing was a candidate: measured again
                try:
                    self._memo.setdefault(machine, {})[key] = KernelDecision(**value)
                except TypeError:
                    continue  # an entry of another format: measured again when needed

    def _save(self, machine: str, key: str, decision: KernelDecision) -> None:
        if self.path is None:
            return
        data = self._read()  # another process may have added entries meanwhile
        data.setdefault("machines", {}).setdefault(machine, {})[key] = asdict(decision)
        self._write(data)


_tuners: dict[Path, KernelTuner] = {}
_tuners_lock = threading.Lock()


def default_tuner() -> KernelTuner:
    """The process-wide tuner keeping its measurements in ``$EXITWISE_CACHE/kernels.json``."""
    path = cache_root() / "kernels.json"
    with _tuners_lock:
        if path not in _tuners:
            _tuners[path] = KernelTuner(path)
        return _tuners[path]

"""Few-row linear products that read their weight once, used only where measured faster.

Speculative decoding pays off when checking k + 1 tokens costs about as much as one step. On a
GPU that holds by itself. On a CPU at batch 1 a decoder step is bound by streaming the weights
from memory, so it *could* hold too, but ``F.linear`` on a handful of rows may take a BLAS path
that costs far more than a one-row product. Computing the same product as ``(W @ x^T)^T``
hands the BLAS a tall-skinny product that streams ``W`` once; an odd row count is padded with
one zero row, because on some CPUs a one- or three-column product streams a large weight
slower than a two- or four-column one. The products of the real rows are unchanged up to
round-off (not bit for bit).

Whether that wins is a property of the CPU, its BLAS, the thread count and the weight's shape:
on one AMD EPYC it made SmolLM2's decoding steps faster, on an Intel Xeon it made them twice
as slow. So nothing here is chosen by a constant:

- ``kernels="stock"``: ``nn.Linear`` as everyone runs it (Hugging Face's numerics bit for bit).
- ``kernels="streaming"``: every few-row product of the given modules streams (when asked).
- ``kernels="auto"`` (what :func:`exitwise.generate` uses unless told otherwise): for every
  (weight shape, row count) that occurs, :class:`KernelTuner` times the stock and the streaming
  product over *all* the model's weights of that shape (as a forward pass reads them, so the
  weights come from memory, not from cache), the two alternating, and streams only when the
  median paired ratio is below ``1 - margin``; otherwise, and whenever in doubt, stock. When
  no weight shape of the model streams at any row count 1..``max_rows``, nothing is rerouted
  at all (rerouting costs a Python call per operation: on a small model more than any
  few-row product could gain), so "auto" is then exactly "stock". Products that win alone can
  still lose in a whole forward pass (on one AMD EPYC every SmolLM2 shape streamed faster
  alone at one row, yet the whole stack streamed took 1.3x as long), so when the caller gives
  a *stack probe* (:class:`StackProbe`: one forward pass of the whole model on a given number
  of rows, e.g. :class:`~exitwise.backbones.stack_probe.DecoderStackProbe`), each row count
  that some shape would stream at is also timed end to end, rerouted vs stock, in pairs, and
  keeps rerouting only where the whole pass is faster by the margin. Each
  choice is measured once per machine (CPU model, torch version, thread count) and kept in
  ``$EXITWISE_CACHE/kernels.json``; delete that file, or call :meth:`KernelTuner.clear`, to
  measure again. The environment variable ``EXITWISE_KERNELS`` (``auto``/``stock``/
  ``streaming``) overrides the default of :func:`resolve_kernels`.

How the products are rerouted: :func:`few_row_kernels` enters a ``TorchFunctionMode`` that sees
each ``F.linear`` call of the current thread and reroutes those whose weight belongs to the
given modules. The user's modules, their classes and every global stay exactly as they were, a
second thread is unaffected, and leaving the ``with`` block (also by an exception) ends it.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from ..machine import machine_key
from ..paths import cache_root

KERNELS = ("auto", "stock", "streaming")
DEFAULT_MAX_ROWS = 8
ENV_VAR = "EXITWISE_KERNELS"

logger = logging.getLogger(__name__)


def resolve_kernels(kernels: str | None) -> str:
    """``kernels`` checked; None -> ``$EXITWISE_KERNELS`` or ``"auto"``."""
    if kernels is None:
        kernels = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        where = f"${ENV_VAR}"
    else:
        where = "kernels"
    if kernels not in KERNELS:
        raise ConfigError(f"unknown {where} {kernels!r}; choose from {', '.join(KERNELS)}")
    return kernels


def streaming_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x^T)^T``, an odd row count padded
    with a zero row. x: (..., in) with few rows; weight: (out, in); returns (..., out)."""
    rows = x.numel() // max(x.shape[-1], 1)
    flat = x.reshape(rows, x.shape[-1])
    if rows % 2:
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
    # (out, rows) -> (rows, out), made contiguous (rows x out floats, a trivial copy): a
    # transposed view would make every later op of the block run on strided memory.
    out = torch.mm(weight, flat.t())[:, :rows].t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


@dataclass
class KernelDecision:
    """One measured choice: stream or not, with the medians it rests on (ms per pass over
    every weight of the shape) and the median of the paired streaming/stock ratios."""

    stream: bool
    ratio: float
    stock_ms: float
    streaming_ms: float


def paired_choice(
    stock_s: Sequence[float], streaming_s: Sequence[float], margin: float
) -> KernelDecision:
    """The rule of ``kernels="auto"``: times of the two kernels taken in pairs (seconds, run
    back to back); stream when the median of the paired ratios streaming/stock is below
    ``1 - margin``."""
    if not stock_s or len(stock_s) != len(streaming_s):
        raise ConfigError("paired_choice needs two equally long, non-empty lists of times")
    ratio = statistics.median(s / max(t, 1e-12) for t, s in zip(stock_s, streaming_s))
    return KernelDecision(
        stream=ratio < 1.0 - margin, ratio=ratio,
        stock_ms=1000 * statistics.median(stock_s),
        streaming_ms=1000 * statistics.median(streaming_s),
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
    ``key`` names the model (architecture and shapes), so a verdict is reused only for it."""

    key: str

    def __call__(self, rows: int) -> float: ...


def _key(weights: Sequence[torch.Tensor], rows: int) -> str:
    w = weights[0]
    dtype = str(w.dtype).replace("torch.", "")
    return f"{dtype}:{w.shape[0]}x{w.shape[1]}:n{len(weights)}:r{rows}"


class KernelTuner:
    """Measured stock-vs-streaming choices for this machine (see module doc); thread-safe.

    path: the JSON file that keeps measurements across runs (None: this process only).
    margin: streaming must be at least this much faster (median paired ratio < 1 - margin).
    repeats: timed pairs per measurement (fewer for a pass that takes longer than 0.1 s).
    """

    def __init__(
        self, path: str | Path | None = None, margin: float = 0.05, repeats: int = 9
    ) -> None:
        if not 0.0 <= margin < 1.0:
            raise ConfigError(f"margin must be in [0, 1); got {margin!r}")
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

    # -- the decisions ----------------------------------------------------------------------
    def decide(self, weights: Sequence[torch.Tensor], rows: int) -> KernelDecision:
        """The choice for a product of ``rows`` rows with each of ``weights`` (all one shape
        and dtype), measured now if this machine has never measured it."""
        key = _key(weights, rows)
        machine = machine_key()
        with self._lock:
            self._load()
            known = self._memo.setdefault(machine, {}).get(key)
            if known is not None:
                return known
            decision = self._measure(weights, rows)
            self._memo[machine][key] = decision
            self._save(machine, key, decision)
        logger.info("kernels %s on %s: %s", key, machine, decision)
        return decision

    def any_stream(self, groups: Sequence[Sequence[torch.Tensor]], max_rows: int) -> bool:
        """Whether any of these weight groups streams at any row count 1..``max_rows`` on this
        machine (each measured now if never measured). When none does, a caller need not
        reroute products at all: rerouting itself costs a Python call per operation, which on
        a small model outweighs what a few-row product could gain."""
        keys = tuple(sorted(_key(g, r) for g in groups for r in range(1, max_rows + 1)))
        memo_key = (machine_key(), keys)
        known = self._verdicts.get(memo_key)
        if known is None:
            known = any(self.decide(g, r).stream for g in groups
                        for r in range(1, max_rows + 1))
            self._verdicts[memo_key] = known
        return known

    def check_stack(
        self, probe: StackProbe, rows: int, routed: Callable[[], float]
    ) -> KernelDecision:
        """Whether rerouting pays for a whole forward pass of ``probe``'s model at ``rows``
        rows: ``probe(rows)`` (stock) against ``routed()`` (the same pass rerouted), paired;
        measured once per machine and kept like the per-shape choices."""
        key = f"stack:{probe.key}:r{rows}"
        machine = machine_key()
        with self._lock:
            self._load()
            known = self._memo.setdefault(machine, {}).get(key)
            if known is not None:
                return known
            decision = self._measure_stack(lambda: probe(rows), routed)
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

        def streaming() -> float:
            t0 = time.perf_counter()
            for w in weights:
                streaming_linear(x, w)
            return time.perf_counter() - t0

        a, b = paired_times(stock, streaming, self.repeats)
        return paired_choice(a, b, self.margin)

    @torch.inference_mode()
    def _measure_stack(
        self, stock: Callable[[], float], routed: Callable[[], float]
    ) -> KernelDecision:
        # Whole passes are long: 5 pairs at most (each a paired ratio, so drift cancels).
        a, b = paired_times(stock, routed, min(self.repeats, 5))
        return paired_choice(a, b, self.margin)

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


@dataclass
class KernelScope:
    """What one :func:`few_row_kernels` block did: ``calls`` counts, per
    ``dtype:OUTxIN:nWEIGHTS:rROWS``, the products that ``"streamed"`` and those left to
    ``"stock"`` (products of more rows, or of weights outside the scope, are not counted)."""

    kernels: str
    weights: int
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    #: row counts whose products may be rerouted (None: every count 1..max_rows); a stack
    #: probe narrows it to the counts where the whole pass measured faster rerouted
    rows: tuple[int, ...] | None = None

    @property
    def streamed(self) -> int:
        return sum(c.get("streamed", 0) for c in self.calls.values())


def _weight_groups(modules: Sequence[nn.Module | None]) -> dict[int, list[torch.Tensor]]:
    """id(weight) -> every 2-D ``nn.Linear`` weight under ``modules`` of the same shape and
    dtype (shared weights counted once)."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            w = getattr(m, "weight", None)
            if not isinstance(m, nn.Linear) or not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            if id(w) in seen or w.device.type != "cpu" or not w.is_floating_point():
                continue
            seen.add(id(w))
            by_shape.setdefault((tuple(w.shape), w.dtype), []).append(w)
    return {id(w): group for group in by_shape.values() for w in group}


class _FewRowMode(TorchFunctionMode):
    """Reroutes the few-row ``F.linear`` calls on the scoped weights (see module doc)."""

    def __init__(
        self, groups: dict[int, list[torch.Tensor]], scope: KernelScope, max_rows: int,
        tuner: KernelTuner, rows: frozenset[int] | None = None,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.groups = groups
        self.scope = scope
        self.max_rows = max_rows
        self.tuner = tuner
        self.always = scope.kernels == "streaming"
        self.memo: dict[tuple[int, int], tuple[bool, dict[str, int], str]] = {}
        self.entered = False  # per_call use: inside a rerouted() block now

    def wants(self, rows: int) -> bool:
        """Whether products of ``rows`` rows may be rerouted (then decided per shape)."""
        return 1 <= rows <= self.max_rows and (self.rows is None or rows in self.rows)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        group = self.groups.get(id(w))
        if (
            group is None or not isinstance(x, torch.Tensor) or x.device.type != "cpu"
            or x.dtype != w.dtype or x.dim() == 0 or torch.is_grad_enabled()
        ):
            return func(*args, **kwargs)
        rows = x.numel() // max(x.shape[-1], 1)
        if not self.wants(rows):
            return func(*args, **kwargs)
        # Decided once per (shape group, rows) in this scope: this runs for every product of
        # every step, so it must not format keys or take the tuner's lock each time.
        memo = self.memo.get((id(group), rows))
        if memo is None:
            stream = self.always or self.tuner.decide(group, rows).stream
            counts = self.scope.calls.setdefault(_key(group, rows), {})
            memo = self.memo[(id(group), rows)] = (stream, counts, "streamed" if stream else "stock")
        stream, counts, which = memo
        counts[which] = counts.get(which, 0) + 1
        if not stream:
            return func(*args, **kwargs)
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return streaming_linear(x, w, b)


@contextmanager
def few_row_kernels(
    *modules: nn.Module | None,
    kernels: str | None = "auto",
    max_rows: int = DEFAULT_MAX_ROWS,
    tuner: KernelTuner | None = None,
    probe: StackProbe | None = None,
    per_call: bool = False,
) -> Iterator[KernelScope]:
    """Within the block, on this thread, few-row products (1..``max_rows`` rows, no autograd,
    CPU) with the ``nn.Linear`` weights under ``modules`` use the streaming kernel when
    ``kernels`` says so ("auto": where measured faster, and with ``probe`` only at the row
    counts where a whole pass measured faster; see module doc). Nothing of the modules is
    changed. Yields a :class:`KernelScope` that counts what ran.

    per_call: reroute only inside :func:`rerouted` blocks whose row count is allowed, instead
        of everywhere in the block. Rerouting intercepts every torch call (about 16% of a
        SmolLM2 step at one row on one CPU), so code that knows its row counts (exitwise's
        decoders: each pass of blocks, the LM head and the exit heads) pays it only where it
        gains."""
    kernels = resolve_kernels(kernels)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ConfigError(f"max_rows must be an int >= 1; got {max_rows!r}")
    groups = {} if kernels == "stock" else _weight_groups(modules)
    scope = KernelScope(kernels=kernels, weights=len(groups))
    tuner = tuner or default_tuner()
    allowed: frozenset[int] | None = None
    if kernels == "auto" and groups:
        unique = list({id(g[0]): g for g in groups.values()}.values())
        if not tuner.any_stream(unique, max_rows):
            groups = {}  # every product stays stock: do not pay for rerouting at all
        elif probe is not None:
            allowed = _rows_that_pay(groups, unique, max_rows, tuner, probe)
            scope.rows = tuple(sorted(allowed))
            if not allowed:
                groups = {}
    if not groups:
        yield scope
        return
    mode = _FewRowMode(groups, scope, max_rows, tuner, allowed)
    if not per_call:
        with mode:
            yield scope
        return
    previous = getattr(_local, "router", None)
    _local.router = mode
    try:
        yield scope
    finally:
        _local.router = previous


_local = threading.local()  # .router: the _FewRowMode of the per_call scope of this thread


@contextmanager
def rerouted(x: torch.Tensor) -> Iterator[None]:
    """Inside a ``few_row_kernels(..., per_call=True)`` scope of this thread: the products of
    the block are rerouted when ``x`` (..., in), the input of the block's products, has a row
    count the scope reroutes; elsewhere (and nested) it does nothing and costs one lookup."""
    mode = getattr(_local, "router", None)
    if mode is None or mode.entered or not mode.wants(x.numel() // max(x.shape[-1], 1)):
        yield
        return
    mode.entered = True
    try:
        with mode:
            yield
    finally:
        mode.entered = False


def _rows_that_pay(
    groups: dict[int, list[torch.Tensor]], unique: Sequence[Sequence[torch.Tensor]],
    max_rows: int, tuner: KernelTuner, probe: StackProbe,
) -> frozenset[int]:
    """The row counts 1..max_rows at which some shape streams *and* the probe's whole pass,
    rerouted as decided per shape, is faster than stock (see :meth:`KernelTuner.check_stack`)."""
    keep = set()
    for rows in range(1, max_rows + 1):
        if not any(tuner.decide(g, rows).stream for g in unique):
            continue
        if tuner.check_stack(probe, rows, _routed(groups, tuner, probe, rows)).stream:
            keep.add(rows)
    return frozenset(keep)


def _routed(
    groups: dict[int, list[torch.Tensor]], tuner: KernelTuner, probe: StackProbe, rows: int
) -> Callable[[], float]:
    """``probe(rows)`` with the products of ``rows`` rows rerouted as decided per shape."""

    def run() -> float:
        # a scope of its own: the probe's products must not count as the caller's
        trial = KernelScope(kernels="auto", weights=len(groups))
        with _FewRowMode(groups, trial, rows, tuner, frozenset((rows,))):
            return probe(rows)

    return run


def autotune(
    *modules: nn.Module | None,
    rows: Sequence[int] = (1, 2),
    tuner: KernelTuner | None = None,
    probe: StackProbe | None = None,
) -> dict[str, KernelDecision]:
    """Measure now (instead of at first use) the choice for every weight shape under
    ``modules`` at each row count, and with ``probe`` the whole-pass check at each of those
    counts where some shape streams (keys ``stack:<probe.key>:r<rows>``); returns the
    decisions by key. Already measured ones are reused (``tuner.clear()`` first to measure
    again)."""
    tuner = tuner or default_tuner()
    out: dict[str, KernelDecision] = {}
    by_weight = _weight_groups(modules)
    groups = {id(g[0]): g for g in by_weight.values()}
    for r in rows:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"rows must be ints >= 1; got {r!r}")
        for group in groups.values():
            out[_key(group, r)] = tuner.decide(group, r)
    if probe is not None and rows:
        for r in rows:
            if any(out[_key(g, r)].stream for g in groups.values()):
                routed = _routed(by_weight, tuner, probe, r)
                out[f"stack:{probe.key}:r{r}"] = tuner.check_stack(probe, r, routed)
    return out

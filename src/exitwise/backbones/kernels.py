"""Few-row linear products computed without the stock path's overhead, only where measured
faster.

Speculative decoding pays off when checking k + 1 tokens costs about as much as one step. On a
GPU that holds by itself. On a CPU at batch 1 a decoder step is bound by streaming the weights
from memory, so it *could* hold too, but ``F.linear`` on a handful of rows may take a BLAS path
that costs far more than a one-row product (the BLAS re-packs the weight on every call). Two
alternatives compute the same products, equal up to round-off (not bit for bit):

- *streaming* (:mod:`.streaming`): ``(W @ x^T)^T``, a tall-skinny product that streams ``W``
  once; an odd row count is padded with one zero row, because on some CPUs a one- or
  three-column product streams a large weight slower than a two- or four-column one;
- *packed* (:mod:`.packed`): oneDNN's product with a copy of ``W`` laid out once for its
  kernels, so no call repacks it (float32, where the PyTorch build has oneDNN; the copy costs
  the weight's memory again).

Whether either wins is a property of the CPU, its BLAS, the thread count and the weight's
shape: on one AMD EPYC streaming made SmolLM2's decoding steps faster, on an Intel Xeon it made
them twice as slow. So nothing here is chosen by a constant:

- ``kernels="stock"``: ``nn.Linear`` as everyone runs it (Hugging Face's numerics bit for bit).
- ``kernels="streaming"`` / ``"packed"``: every few-row product of the given modules takes that
  path (when asked; packed falls back to streaming for weights oneDNN cannot pack).
- ``kernels="auto"`` (what :func:`exitwise.generate` uses unless told otherwise): for every
  (weight shape, row count) that occurs, :class:`KernelTuner` times the stock product against
  each alternative over *all* the model's weights of that shape (as a forward pass reads them,
  so the weights come from memory, not from cache), in alternating pairs, and reroutes to the
  alternative with the lowest median paired ratio only when that ratio is below
  ``1 - margin``; otherwise, and whenever in doubt, stock. When
  no weight shape of the model is rerouted at any row count 1..``max_rows``, nothing is rerouted
  at all (rerouting costs a Python call per operation: on a small model more than any
  few-row product could gain), so "auto" is then exactly "stock". Products that win alone can
  still lose in a whole forward pass (on one AMD EPYC every SmolLM2 shape streamed faster
  alone at one row, yet the whole stack streamed took 1.3x as long), so when the caller gives
  a *stack probe* (:class:`StackProbe`: one forward pass of the whole model on a given number
  of rows, e.g. :class:`~exitwise.backbones.stack_probe.DecoderStackProbe`), each row count
  that some shape would be rerouted at is also timed end to end, rerouted vs stock, in pairs,
  and keeps rerouting only where the whole pass is faster by the margin. Each
  choice is measured once per machine (CPU model, torch version, thread count) and kept in
  ``$EXITWISE_CACHE/kernels.json``; delete that file, or call :meth:`KernelTuner.clear`, to
  measure again. The environment variable ``EXITWISE_KERNELS`` (``auto``/``stock``/
  ``streaming``/``packed``) overrides the default of :func:`resolve_kernels`.

How the products are rerouted, in two ways; in both the user's modules, their classes and
every global stay exactly as they were, a second thread is unaffected, and leaving the
``with`` block (also by an exception) ends it:

- :func:`few_row_kernels` enters a ``TorchFunctionMode`` that sees each ``F.linear`` call of the
  current thread and reroutes those whose weight belongs to the given modules. It works for any
  code, but it intercepts every torch call, which costs a Python call per operation.
- ``per_call=True`` (what exitwise's decoders use): only modules passed through :func:`routed`
  are rerouted, through a few-row *view* (:mod:`.views`: a shallow copy whose linears choose
  their kernel; nothing else is intercepted). Passes of decoder blocks are routed at the row
  counts the whole-pass check kept; the LM head, a single product, wherever its shape measured
  faster (measurements: ``docs/benchmarks/lm_kernels.md``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError
from .kernel_tuner import (  # noqa: F401  (re-exported: the measuring half of this module)
    KernelDecision,
    KernelTuner,
    StackProbe,
    default_tuner,
    paired_choice,
    paired_times,
    shape_key,
    stack_key,
)
from .packed import can_pack, packed_linear
from .streaming import streaming_linear
from .views import few_row_view

KERNELS = ("auto", "stock", "streaming", "packed")
DEFAULT_MAX_ROWS = 8
ENV_VAR = "EXITWISE_KERNELS"



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


@dataclass
class KernelScope:
    """What one :func:`few_row_kernels` block did: ``calls`` counts, per
    ``dtype:OUTxIN:nWEIGHTS:rROWS``, the products that ``"streamed"``, those ``"packed"`` and
    those left to ``"stock"`` (products of more rows, or of weights outside the scope, are not
    counted)."""

    kernels: str
    weights: int
    calls: dict[str, dict[str, int]] = field(default_factory=dict)
    #: row counts whose products may be rerouted (None: every count 1..max_rows); a stack
    #: probe narrows it to the counts where the whole pass measured faster rerouted
    rows: tuple[int, ...] | None = None

    @property
    def streamed(self) -> int:
        """Products rerouted (streamed or packed)."""
        return sum(c.get("streamed", 0) + c.get("packed", 0) for c in self.calls.values())


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


class _Decider:
    """The kernel of each few-row product on the scoped weights, decided once per (shape
    group, row count) in one scope and counted in its :class:`KernelScope`."""

    def __init__(
        self, groups: dict[int, list[torch.Tensor]], scope: KernelScope, max_rows: int,
        tuner: KernelTuner,
    ) -> None:
        self.groups = groups
        self.scope = scope
        self.max_rows = max_rows
        self.tuner = tuner
        # a kind forced by the caller ("streaming" / "packed"), else None: measured per shape
        self.always = scope.kernels if scope.kernels in ("streaming", "packed") else None
        self.memo: dict[tuple[int, int], tuple[Callable | None, dict[str, int], str]] = {}

    def scoped(self, linear: nn.Linear) -> bool:
        return id(linear.weight) in self.groups

    def kernel(self, x: object, w: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        """The kernel for ``F.linear(x, w, ...)``, or None for the stock product (weights
        outside the scope, autograd, other devices or dtypes, more than max_rows rows)."""
        group = self.groups.get(id(w))
        if (
            group is None or not isinstance(x, torch.Tensor) or not x.is_cpu
            or x.dtype != w.dtype or x.dim() == 0 or torch.is_grad_enabled()
        ):
            return None
        rows = _rows_of(x)
        if not 1 <= rows <= self.max_rows:
            return None
        # Decided once per (shape group, rows) in this scope: this runs for every product of
        # every step, so it must not format keys or take the tuner's lock each time.
        memo = self.memo.get((id(group), rows))
        if memo is None:
            kind = self.always
            if kind is None:
                decision = self.tuner.decide(group, rows)
                kind = decision.kind if decision.stream else "stock"
            if kind == "packed" and not can_pack(w):
                kind = "streaming"  # forced packing where oneDNN cannot pack: stream instead
            kernel = {"streaming": streaming_linear, "packed": packed_linear}.get(kind)
            counts = self.scope.calls.setdefault(shape_key(group, rows), {})
            which = {"streaming": "streamed", "packed": "packed"}.get(kind, "stock")
            memo = self.memo[(id(group), rows)] = (kernel, counts, which)
        kernel, counts, which = memo
        counts[which] = counts.get(which, 0) + 1
        return kernel


class _FewRowMode(TorchFunctionMode):
    """Reroutes the few-row ``F.linear`` calls on the scoped weights (see module doc) of the
    allowed row counts (None: all)."""

    def __init__(self, decider: _Decider, rows: frozenset[int] | None = None) -> None:
        super().__init__()
        self.decider = decider
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        if self.rows is not None and isinstance(x, torch.Tensor) and _rows_of(x) not in self.rows:
            return func(*args, **kwargs)
        kernel = self.decider.kernel(x, w)
        if kernel is None:
            return func(*args, **kwargs)
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return kernel(x, w, b)


class _Router:
    """A per_call scope on one thread: which passes are rerouted, and their views."""

    def __init__(self, decider: _Decider, allowed: frozenset[int] | None) -> None:
        self.decider = decider
        self.allowed = allowed  # row counts of rerouted passes (None: every count)
        self.mode = _FewRowMode(decider)
        self.entered = False  # inside a rerouted() block now
        self.views: dict[int, tuple[nn.Module, nn.Module]] = {}  # id -> (module, its view)

    def wants(self, rows: int, single: bool) -> bool:
        if not 1 <= rows <= self.decider.max_rows:
            return False
        return single or self.allowed is None or rows in self.allowed

    def view(self, module: nn.Module) -> nn.Module:
        known = self.views.get(id(module))
        if known is None or known[0] is not module:
            d = self.decider
            known = self.views[id(module)] = (module, few_row_view(module, d.scoped, d.kernel))
        return known[1]


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
    CPU) with the ``nn.Linear`` weights under ``modules`` use the kernel ``kernels`` says
    ("auto": where measured faster, and with ``probe`` only at the row counts where a whole
    pass measured faster; see module doc). Nothing of the modules is changed. Yields a
    :class:`KernelScope` that counts what ran.

    per_call: instead of rerouting every product in the block (a ``TorchFunctionMode`` that
        intercepts every torch call, a cost comparable to what the products gain),
        reroute only the modules that code running in the block passes through
        :func:`routed` (a view of the module whose linears choose their kernel; nothing else
        is intercepted) and the code in :func:`rerouted` blocks. exitwise's decoders do:
        each pass of blocks at the row counts where the whole pass measured faster, and the
        LM head and exit heads (single-product sites) wherever their shape measured faster."""
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
            allowed = _rows_that_pay(groups, unique, max_rows, tuner, probe, per_call)
            scope.rows = tuple(sorted(allowed))
            if not allowed and not per_call:
                groups = {}  # (per_call still reroutes single-product sites)
    if not groups:
        yield scope
        return
    decider = _Decider(groups, scope, max_rows, tuner)
    if not per_call:
        with _FewRowMode(decider, allowed):
            yield scope
        return
    with _installed(_Router(decider, allowed)):
        yield scope


_local = threading.local()  # .router: the _Router of the per_call scope of this thread


@contextmanager
def _installed(router: _Router | None) -> Iterator[None]:
    previous = getattr(_local, "router", None)
    _local.router = router
    try:
        yield
    finally:
        _local.router = previous


def _rows_of(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def routed(module: nn.Module, x: torch.Tensor, single: bool = False) -> nn.Module:
    """Inside a ``few_row_kernels(..., per_call=True)`` scope of this thread: the few-row view
    of ``module`` (:mod:`.views`; made once per scope) when ``x`` (..., in), the input of its
    products, has a row count the scope reroutes, else ``module`` itself (also outside any
    scope, at the cost of one lookup).

    single: ``module`` is a single-product site (an LM head): its per-shape measurement *is*
        the site's, so it is rerouted at every few-row count where its shape measured faster,
        without the whole-pass check (which is about passes of many operations)."""
    router = getattr(_local, "router", None)
    if router is None or not router.wants(_rows_of(x), single):
        return module
    return router.view(module)


@contextmanager
def rerouted(x: torch.Tensor) -> Iterator[None]:
    """Inside a ``few_row_kernels(..., per_call=True)`` scope of this thread: every product of
    the block on scoped weights takes the kernel its shape measured faster when ``x``
    (..., in), the input of the block's products, has 1..max_rows rows. For small code of a
    few operations with modules that must not be copied (exit heads, which may keep state):
    it intercepts every torch call inside. Elsewhere (and nested) it costs one lookup."""
    router = getattr(_local, "router", None)
    if router is None or router.entered or not router.wants(_rows_of(x), single=True):
        yield
        return
    router.entered = True
    try:
        with router.mode:
            yield
    finally:
        router.entered = False


def _rows_that_pay(
    groups: dict[int, list[torch.Tensor]], unique: Sequence[Sequence[torch.Tensor]],
    max_rows: int, tuner: KernelTuner, probe: StackProbe, views: bool,
) -> frozenset[int]:
    """The row counts 1..max_rows at which some shape streams *and* the probe's whole pass,
    rerouted as decided per shape (through views, or by interception), is faster than stock
    (see :meth:`KernelTuner.check_stack`)."""
    keep = set()
    for rows in range(1, max_rows + 1):
        if not any(tuner.decide(g, rows).stream for g in unique):
            continue
        stock, rerouted_pass = _pass_pair(groups, tuner, probe, rows, views)
        if tuner.check_stack(probe, rows, rerouted_pass, stock, views).stream:
            keep.add(rows)
    return frozenset(keep)


def _pass_pair(
    groups: dict[int, list[torch.Tensor]], tuner: KernelTuner, probe: StackProbe, rows: int,
    views: bool,
) -> tuple[Callable[[], float], Callable[[], float]]:
    """``probe(rows)`` stock and rerouted, each in a scope of its own (the probe's products
    must not count as the caller's). By interception: the whole pass or nothing. Through views
    (as decoding runs it): a per_call scope whose single-product sites are rerouted in both,
    so the pair differs only in the passes of blocks."""

    def run(allowed: frozenset[int]) -> Callable[[], float]:
        # one decider and router per arm, made here: a view is built at its first use, which
        # must fall in the untimed warm-up pass as it falls once per generate call
        decider = _Decider(groups, KernelScope("auto", len(groups)), rows, tuner)
        router = _Router(decider, allowed)

        def timed() -> float:
            if not views:
                with _FewRowMode(decider, allowed):
                    return probe(rows)
            with _installed(router):
                return probe(rows)

        return timed

    if not views:
        return (lambda: probe(rows)), run(frozenset((rows,)))
    return run(frozenset()), run(frozenset((rows,)))


def autotune(
    *modules: nn.Module | None,
    rows: Sequence[int] = (1, 2),
    tuner: KernelTuner | None = None,
    probe: StackProbe | None = None,
    per_call: bool = False,
) -> dict[str, KernelDecision]:
    """Measure now (instead of at first use) the choice for every weight shape under
    ``modules`` at each row count, and with ``probe`` the whole-pass check at each of those
    counts where some shape streams (keys :func:`stack_key`; ``per_call``: the check of
    passes rerouted through views, as ``few_row_kernels(..., per_call=True)`` and exitwise's
    decoders use); returns the decisions by key. Already measured ones are reused
    (``tuner.clear()`` first to measure again)."""
    tuner = tuner or default_tuner()
    out: dict[str, KernelDecision] = {}
    by_weight = _weight_groups(modules)
    groups = {id(g[0]): g for g in by_weight.values()}
    for r in rows:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"rows must be ints >= 1; got {r!r}")
        for group in groups.values():
            out[shape_key(group, r)] = tuner.decide(group, r)
    if probe is not None and rows:
        for r in rows:
            if any(out[shape_key(g, r)].stream for g in groups.values()):
                stock, rerouted_pass = _pass_pair(by_weight, tuner, probe, r, per_call)
                out[stack_key(probe, r, per_call)] = tuner.check_stack(
                    probe, r, rerouted_pass, stock, per_call)
    return out

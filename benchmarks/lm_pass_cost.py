"""What one decoding pass of a whole decoder costs at 1..4 new rows, by rerouting mechanism.

    python benchmarks/lm_pass_cost.py --threads 2        # SmolLM2-135M, about 5 minutes

Speculative decoding pays when verifying k + 1 tokens costs about one plain step. This times
one pass (``DecoderStackProbe``: the new rows through every block, the final norm and the LM
head, after 64 cached tokens, batch 1) per row count, each way exitwise can run it:

- ``stock``: ``nn.Linear`` as Hugging Face runs it;
- ``null_mode``: stock, inside a ``TorchFunctionMode`` that reroutes nothing (the price of
  intercepting every torch call);
- ``mode``: the products rerouted by that interception, each shape as ``kernels="auto"``
  decided it (``few_row_kernels(..., per_call=False)``);
- ``head_only``: blocks stock, the LM head through its few-row view (what ``generate`` runs at
  a row count whose whole-pass check failed);
- ``views``: every block and the LM head through few-row views, each shape as decided
  (what ``generate`` runs at a row count whose whole-pass check passed).

All configurations are interleaved per repetition; medians; ratios against the one-row stock
pass of the same run. The per-shape decisions come from this machine's kernel cache (measured
first when absent). The routers are built once per configuration, outside the timing, as
``generate`` builds one per call. This reaches into :mod:`exitwise.backbones.kernels`'s
private router to time each mechanism at a fixed row count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import exitwise as ew  # noqa: E402
from exitwise.backbones import kernels as K  # noqa: E402
from exitwise.backbones.stack_probe import DecoderStackProbe  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import load_lm  # noqa: E402


class _Null(TorchFunctionMode):
    """Intercepts every torch call and changes none."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        return func(*args, **(kwargs or {}))


def configs(probe: DecoderStackProbe, groups: dict, rows: int) -> dict[str, Callable[[], float]]:
    """name -> a timed pass of ``rows`` rows."""
    tuner = K.default_tuner()

    def decider() -> K._Decider:
        return K._Decider(groups, K.KernelScope("auto", len(groups)), 8, tuner)

    def under(make: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            with make():  # type: ignore[attr-defined]
                return probe(rows)

        return run

    mode = K._FewRowMode(decider())
    views = K._Router(decider(), None)
    head = K._Router(decider(), frozenset())
    return {
        "stock": lambda: probe(rows),
        "null_mode": under(_Null),
        "mode": under(lambda: mode),
        "head_only": under(lambda: K._installed(head)),
        "views": under(lambda: K._installed(views)),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,3,4")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_pass_cost.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm, _ = load_lm(args.model)
    bb = ew.wrap_backbone(lm)
    probe = DecoderStackProbe(bb)
    groups = K._weight_groups([bb.model])
    row_counts = [int(r) for r in args.rows.split(",") if r]
    runs = {(r, name): fn for r in row_counts for name, fn in configs(probe, groups, r).items()}
    for fn in runs.values():  # warm-up: caches, packed copies, views, per-shape decisions
        fn()
    samples: dict[tuple[int, str], list[float]] = {key: [] for key in runs}
    for rep in range(args.repeats):
        for key, fn in runs.items():
            samples[key].append(fn())
        print(f"[pass_cost] repetition {rep + 1}/{args.repeats}", flush=True)
    base = statistics.median(samples[(row_counts[0], "stock")])
    table = {}
    for (r, name), s in samples.items():
        ms = 1000 * statistics.median(s)
        table.setdefault(str(r), {})[name] = {"ms": ms, "vs_stock_r1": ms / (1000 * base)}
        print(f"rows {r} {name:10s} {ms:7.2f} ms  {ms / (1000 * base):5.3f}x one-row stock")
    report = {
        "benchmark": "lm_pass_cost",
        "command": "python benchmarks/lm_pass_cost.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "setup": {"model": args.model, "pass": f"DecoderStackProbe, batch 1, {probe.context} "
                  "cached tokens", "repeats": args.repeats, "threads": args.threads,
                  "statistic": "median per configuration, all interleaved per repetition"},
        "ms": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

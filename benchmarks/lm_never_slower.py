"""Is the automatic configuration ever slower than plain greedy decoding? Tiny models of every
decoder family, measured.

    python benchmarks/lm_never_slower.py --threads 2

For each decoder family exitwise supports (the random 4-layer test models of
``tests/helpers/lmkit.py``, widened by ``--hidden``), at batch 1 and 4, interleaved per
repetition (every method back to back on the same prompts, the order rotated): exitwise's
greedy on stock kernels (the baseline), its greedy with the default kernels (``auto``),
self-speculative decoding through the untuned shared head at layer 1 with ``draft_len="auto"``,
and ANPD with ``draft_len="auto"``. Random models accept few drafts, so speculation rarely pays
here: what is measured is whether the automatic choice falls back to plain decoding without
costing more than noise. Medians of ``--repeats`` runs; ``never_slower`` is true when every
automatic configuration is at least (1 - tolerance) x the baseline's tokens/s.

The noise is measured, not assumed: the baseline also runs a second time as its own arm
(``greedy_stock_again``, the same code on the same prompts), so its ratio to the baseline is
what timing alone does to a ratio here (an A/A comparison). ``noise`` is the largest such
deviation from 1 over all models and batch sizes, and ``never_slower_beyond_noise`` is true
when every automatic configuration is at least (1 - max(tolerance, noise)) x the baseline.
Writes benchmarks/results/lm_never_slower.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.lmkit import DECODER_FAMILIES, tiny_lm  # noqa: E402

from exitwise.generation import generate  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402

TOLERANCE = 0.05  # tiny models: a step is ~a millisecond, so timing noise is large
METHODS = {
    "greedy_stock": {"strategy": "greedy", "kernels": "stock"},
    "greedy_stock_again": {"strategy": "greedy", "kernels": "stock"},  # A/A: the noise
    "greedy_default": {"strategy": "greedy"},
    "self_spec_auto": {"strategy": "self_speculative", "exit_layer": 1, "draft_len": "auto"},
    "anpd_auto": {"strategy": "anpd", "draft_len": "auto"},
}
AUTO = ("self_spec_auto", "anpd_auto")


def prompts(batch: int, n: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (batch, length), generator=g) for _ in range(n)]


def bench_family(family: str, args: argparse.Namespace) -> dict:
    model = tiny_lm(family, layers=args.layers)
    vocab = int(model.config.vocab_size)
    out: dict = {}
    for bs in args.batch_sizes:
        chunks = prompts(bs, args.prompts // bs or 1, 8, vocab, seed=bs)
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        tokens: dict[str, list] = {}
        names = list(METHODS)
        for m in names:  # warm-up
            generate(model, chunks[0], max_new_tokens=4, eos_token_id=[], **METHODS[m])
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            spent = {m: 0.0 for m in names}
            for ids in chunks:
                for m in order:
                    t0 = time.perf_counter()
                    res = generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=[],
                                   **METHODS[m])
                    spent[m] += time.perf_counter() - t0
                    if r == 0:
                        tokens.setdefault(m, []).append(res.sequences)
            for m in names:
                times[m].append(spent[m])
        n_tokens = len(chunks) * bs * args.new_tokens
        base = statistics.median(times["greedy_stock"])
        row = {}
        for m in names:
            med = statistics.median(times[m])
            same = all(torch.equal(a, b) for a, b in zip(tokens[m], tokens["greedy_stock"]))
            row[m] = {"tokens_per_s": n_tokens / med, "vs_greedy_stock": base / med,
                      "identical_to_greedy": same, "seconds": times[m]}
        out[str(bs)] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--families", default=",".join(DECODER_FAMILIES))
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch size")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_never_slower.json"))
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    t0 = time.time()
    families = {}
    for fam in args.families.split(","):
        families[fam] = bench_family(fam, args)
        worst = min(families[fam][bs][m]["vs_greedy_stock"] for bs in families[fam] for m in AUTO)
        print(f"{fam}: slowest automatic configuration {worst:.3f}x greedy on stock kernels")
    ratios = [families[f][bs][m]["vs_greedy_stock"] for f in families for bs in families[f]
              for m in AUTO]
    noise = max(abs(1 - families[f][bs]["greedy_stock_again"]["vs_greedy_stock"])
                for f in families for bs in families[f])
    report = {
        "command": "python benchmarks/lm_never_slower.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "threads": args.threads, "layers": args.layers,
        "prompts": args.prompts, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "seconds": time.time() - t0, "families": families,
        "summary": {
            "tolerance": TOLERANCE, "never_slower": all(r >= 1 - TOLERANCE for r in ratios),
            "slowest_auto_vs_greedy_stock": min(ratios),
            "noise": noise,
            "never_slower_beyond_noise": all(r >= 1 - max(TOLERANCE, noise) for r in ratios),
            "all_identical": all(v["identical_to_greedy"] for f in families.values()
                                 for row in f.values() for v in row.values()),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()

"""Draft & Verify's Bayesian search on timed decoding, on SmolLM2-135M-Instruct: the search's
own timings, its confirmation against greedy, and the chosen set timed on benchmark prompts.

    python benchmarks/lm_skip_bayes.py --threads 2            # 3 calibration + 8 timed prompts

1. ``bayes_search_skip_layers`` on --search-prompts calibration prompts (never benchmark
   prompts), --search-tokens new tokens each, decoded one at a time: its default probes, then
   --n-iter points chosen by Bayesian optimisation, each scored by the measured tokens/s of
   ``layer_skip`` decoding with its set; every evaluation is kept in
   ``benchmarks/work/lm_skip_bayes/search.json`` (a rerun goes on from it; --fresh starts
   over); then the fastest set re-timed against plain greedy, interleaved, --confirm times;
2. timed at batch 1, interleaved per prompt (chat template, --max-new-tokens each): HF greedy,
   exitwise greedy and ``layer_skip`` with the search's fastest set (whether or not the
   confirmation found it pays, so that what it costs is measured); tokens/s, speed-up vs HF
   greedy, acceptance, exact match, block applications per token. The set is timed as the
   search scored it (--draft-len, --draft-threshold; default the reference's drafts of at
   most 8 stopped by its adaptive confidence threshold) and with exitwise's automatic
   lengths (``draft_len="auto"``, no threshold).

Writes benchmarks/results/lm_skip_bayes.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from lm_bench import (  # noqa: E402
    batch1_parser,
    exitwise_method,
    hf_method,
    load_timed_lm,
    time_on_prompts,
    write_report,
)

from exitwise.generation import bayes_search_skip_layers  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS, CALIBRATION_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import prompt_batch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = batch1_parser(__doc__, ROOT / "benchmarks/results/lm_skip_bayes.json")
    ap.add_argument("--search-prompts", type=int, default=3)
    ap.add_argument("--search-tokens", type=int, default=32)
    ap.add_argument("--n-iter", type=int, default=48)
    ap.add_argument("--confirm", type=int, default=3)
    ap.add_argument("--sublayers", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--draft-len", default="8", help="an int or 'auto'")
    ap.add_argument("--draft-threshold", default="auto",
                    help="'auto', a probability, or 'none'")
    ap.add_argument("--work", default=str(ROOT / "benchmarks/work/lm_skip_bayes"))
    ap.add_argument("--fresh", action="store_true", help="discard the search's checkpoint")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    lm, tok, eos, pad = load_timed_lm(args.model, args.threads)

    cal = list(CALIBRATION_PROMPTS)[: args.search_prompts]
    ids, mask = prompt_batch(tok, cal, "cpu")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / ("search.json" if args.sublayers else "search_blocks.json")
    if args.fresh:
        checkpoint.unlink(missing_ok=True)
    draft_len: int | str = "auto" if args.draft_len == "auto" else int(args.draft_len)
    threshold: float | str | None = (None if args.draft_threshold == "none" else
                                     args.draft_threshold if args.draft_threshold == "auto"
                                     else float(args.draft_threshold))
    t0 = time.time()
    found = bayes_search_skip_layers(
        lm, ids, mask, max_new_tokens=args.search_tokens, n_iter=args.n_iter,
        sublayers=args.sublayers, draft_len=draft_len, draft_threshold=threshold,
        confirm=args.confirm, checkpoint=checkpoint, eos_token_id=sorted(eos) or None,
        pad_token_id=pad)
    seconds = time.time() - t0
    print(f"[search] {seconds:.0f} s (this run): fastest {found.fastest}, "
          f"{found.speedup_vs_greedy:.2f}x greedy in the confirmation")

    common = dict(max_new_tokens=args.max_new_tokens, eos=eos, pad=pad)
    methods = [
        hf_method(lm, "hf_greedy", **common),
        exitwise_method(lm, "exitwise_greedy", "exitwise_greedy", **common),
        exitwise_method(lm, "layer_skip_bayes", "self_spec", strategy="layer_skip",
                        skip=found.fastest, draft_len=draft_len, draft_threshold=threshold,
                        **common),
        exitwise_method(lm, "layer_skip_bayes_auto", "self_spec", strategy="layer_skip",
                        skip=found.fastest, draft_len="auto", **common),
    ]
    prompts = list(BENCH_PROMPTS)[: args.prompts]
    entries = time_on_prompts(lm, tok, methods, prompts, args.repeats, eos)

    scores = [e["tokens_per_s"] for e in found.history]
    report = {
        "benchmark": "lm_skip_bayes",
        "command": "python benchmarks/lm_skip_bayes.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "setup": {"model": args.model, "threads": args.threads, "batch_size": 1,
                  "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                  "repeats": args.repeats, "search_prompts": len(cal),
                  "search_tokens": args.search_tokens, "n_iter": args.n_iter,
                  "sublayers": args.sublayers, "confirm": args.confirm,
                  "draft_len": draft_len, "draft_threshold": threshold},
        "search": {
            "seconds_this_run": seconds,
            "seconds_decoding": sum(e["seconds"] for e in found.history),
            "evaluations": len(found.history),
            "chosen": found.skip, "fastest": found.fastest,
            "fastest_sublayers": sum(len(v) for v in found.fastest.values()),
            "tokens_per_s": found.tokens_per_s,
            "greedy_tokens_per_s": found.greedy_tokens_per_s,
            "speedup_vs_greedy": found.speedup_vs_greedy,
            "confirmation": found.confirmation,
            "best_score_after": [max(scores[: i + 1]) for i in range(len(scores))],
            "history": found.history,
        },
        "methods": entries,
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()

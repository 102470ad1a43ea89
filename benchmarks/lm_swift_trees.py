"""SWIFT's dynamic verification (token trees of the draft model's next choices, wider where
the draft is less sure) against chains, on SmolLM2-135M-Instruct at batch 1.

    python benchmarks/lm_swift_trees.py --threads 2        # 8 prompts x 128 tokens, ~15 min

The drafts come from the model minus a fixed skipped set (by default the fastest set of
``lm_skip_bayes``, read from benchmarks/results/lm_skip_bayes.json; --skip '{"attn": [..],
"mlp": [..]}' to give one) and from SWIFT's on-the-fly search. Timed at batch 1, interleaved
per prompt (chat template, --max-new-tokens each), every output compared with HF greedy:

- ``layer_skip`` with Draft & Verify's reference decoding (drafts of at most 8 stopped by its
  adaptive confidence threshold), as a chain, with SWIFT's confidence widths
  (``tree_width="confidence"``) and with a fixed width of 2;
- the same set with automatic draft lengths, chain and confidence trees;
- ``swift`` with SWIFT's reference decoding (drafts of at most 25 stopped below top-1
  probability 0.8), chain and confidence trees (both share one search, which goes on across
  the prompts as the reference's does).

Reported per method: tokens/s, speed-up vs HF greedy, acceptance, the share of accepted tokens
that were tree siblings, block applications per token (a draft sub-layer counts as half a
block; every verified tree position counts), exact match. Writes
benchmarks/results/lm_swift_trees.json.
"""

from __future__ import annotations

import argparse
import json
import sys
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

from exitwise.errors import ConfigError  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402

BAYES = ROOT / "benchmarks/results/lm_skip_bayes.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = batch1_parser(__doc__, ROOT / "benchmarks/results/lm_swift_trees.json")
    ap.add_argument("--skip", default=None, help="a skip set as JSON (default: lm_skip_bayes's "
                    "fastest set)")
    return ap.parse_args(argv)


def skip_set(given: str | None) -> Any:
    if given is not None:
        return json.loads(given)
    if not BAYES.is_file():
        raise ConfigError(f"no skip set: pass --skip, or run benchmarks/lm_skip_bayes.py "
                          f"first (it writes {BAYES})")
    return json.loads(BAYES.read_text())["search"]["fastest"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    lm, tok, eos, pad = load_timed_lm(args.model, args.threads)
    skip = skip_set(args.skip)
    common = dict(max_new_tokens=args.max_new_tokens, eos=eos, pad=pad)

    def ls(name: str, **options: Any):
        return exitwise_method(lm, name, "self_spec", strategy="layer_skip", skip=skip,
                               **options, **common)

    def sw(name: str, **options: Any):
        return exitwise_method(lm, name, "self_spec", strategy="swift", draft_len=25,
                               draft_threshold=0.8, **options, **common)

    reference = dict(draft_len=8, draft_threshold="auto")  # Draft & Verify's decoding
    methods = [
        hf_method(lm, "hf_greedy", **common),
        exitwise_method(lm, "exitwise_greedy", "exitwise_greedy", **common),
        ls("layer_skip_chain", **reference),
        ls("layer_skip_tree_confidence", tree_width="confidence", **reference),
        ls("layer_skip_tree_2", tree_width=2, **reference),
        ls("layer_skip_auto_chain", draft_len="auto"),
        ls("layer_skip_auto_tree_confidence", draft_len="auto", tree_width="confidence"),
        sw("swift_chain"),
        sw("swift_tree_confidence", tree_width="confidence"),
    ]
    prompts = list(BENCH_PROMPTS)[: args.prompts]
    entries = time_on_prompts(lm, tok, methods, prompts, args.repeats, eos)
    report = {
        "benchmark": "lm_swift_trees",
        "command": "python benchmarks/lm_swift_trees.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "setup": {"model": args.model, "threads": args.threads, "batch_size": 1,
                  "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                  "repeats": args.repeats, "skip": skip,
                  "skip_source": "--skip" if args.skip else str(BAYES.relative_to(ROOT))},
        "methods": entries,
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()

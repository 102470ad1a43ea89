"""How much a draft exit gains from more of the model's own answers: drafters tuned on
different numbers of answers, compared on the same held-out answers none of them trained on.

    python benchmarks/lm_drafter_data.py \
        --big benchmarks/work/lm_speed/smollm2-e2-mlp-v4096-a2400x6-cond --small-answers 1200

``--big``: a folder of ``exitwise tune-lm --objective answers`` (its ``greedy_answers.json``
and tuned exit). The held-out answers are that run's own held-out split (seeded, the tuning
objective's ``eval_fraction``) minus its first ``--small-answers`` answers: a run on fewer
answers with the same seed drew those same leading prompts (``exitwise.recipes.lm`` draws them
with ``nested_chat_prompts``: a larger N only appends), so the smaller drafter never saw what
is left either. The smaller drafter is ``--small``, another tuned folder, or by default the one
shipped with the package for the model at the time of the run (the recorded run compared the
1,200-answer exit shipped until then with the 2,400-answer one shipped since; to repeat it now,
tune the former with ``benchmarks/lm_speed.py --tune-only --answers 1200`` and the options in
its ``drafter.json`` history, and pass that folder as ``--small``). Reports each drafter's
agreement (the share of held-out answer tokens its one-token draft equals: the expected
acceptance of drafts of one) and the answers each was tuned on ->
``benchmarks/results/lm_drafter_data.json``.

Held-out agreement comes from corpus prompts, which the benchmark prompts are not. So, on the
benchmark prompts themselves (all of them unless ``--acceptance-prompts``), each drafter's
exit alone (no n-grams) drafts one token per step, greedy, and the report gives the share of
those drafts the full model accepted (``exit_acceptance``: exact counts, no timing) and the
exit's agreement teacher-forced on the full model's greedy answers to the same prompts,
measured as held-out agreement is (``bench_agreement``).

Then (unless ``--no-timing``; this part needs a quiet machine) both drafters decode the
benchmark prompts at batch 1, interleaved per prompt with HF greedy and exitwise greedy
(``lm_bench.time_on_prompts``): exit + n-gram drafts with automatic lengths (the shipped
default) and with drafts of one, and the exit's token trees sized by SWIFT's confidence rule
(``tree_width="confidence"``) with drafts of one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from lm_bench import (  # noqa: E402
    batch1_parser,
    exitwise_method,
    hf_method,
    load_timed_lm,
    time_on_prompts,
    write_report,
)

import exitwise as ew  # noqa: E402
from exitwise.generation.shipped import find_drafter, with_shipped_drafter  # noqa: E402
from exitwise.lm import agreement_on_answers, generate_answers  # noqa: E402
from exitwise.lm.data import split_holdout  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import ANSWERS_NAME, load_lm, prompt_batch, prompt_ids  # noqa: E402


def held_out(folder: Path, skip_first: int) -> tuple[list, dict]:
    """The tuning run's held-out answers past its first ``skip_first``, and its report."""
    report = json.loads((folder / "tuning_report.json").read_text())
    config = report["config"]
    items = json.loads((folder / ANSWERS_NAME).read_text())["items"]
    answers = [(list(map(int, p)), list(map(int, a))) for p, a in items]
    _, held = split_holdout(list(range(len(answers))), config["eval_fraction"],
                            config["seed"])
    return [answers[i] for i in held if i >= skip_first], report


def exit_acceptance(model, tokenizer, prompts: list[str], max_new_tokens: int,
                    eos: set[int], pad: int) -> dict:
    """Exit-only drafts of one, greedy, batch 1, on each prompt: summed drafted / accepted."""
    drafted = accepted = 0
    for p in prompts:
        ids, mask = prompt_batch(tokenizer, [p])
        out = ew.generate(model, ids, mask,
                          strategy="self_speculative", exit_layer=int(model.exit_layers[0]),
                          draft_len=1, ngram=0, max_new_tokens=max_new_tokens,
                          eos_token_id=sorted(eos), pad_token_id=pad)
        drafted += sum(out.stats.drafted)
        accepted += sum(out.stats.accepted)
    return {"prompts": len(prompts), "drafted": drafted, "accepted": accepted,
            "rate": accepted / max(drafted, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = batch1_parser(__doc__, ROOT / "benchmarks/results/lm_drafter_data.json")
    ap.add_argument("--big", required=True, help="tune-lm folder tuned on more answers")
    ap.add_argument("--small", default=None,
                    help="tune-lm folder tuned on fewer (default: the shipped drafter)")
    ap.add_argument("--small-answers", type=int, required=True,
                    help="how many answers the smaller drafter was tuned on")
    ap.add_argument("--acceptance-prompts", type=int, default=len(BENCH_PROMPTS),
                    help="benchmark prompts for exit-only acceptance (0: skip)")
    ap.add_argument("--no-timing", action="store_true", help="no timing")
    args = ap.parse_args(argv)
    big = Path(args.big)
    answers, big_report = held_out(big, args.small_answers)
    if not answers:
        raise SystemExit(f"no held-out answer of {big} lies past the first "
                         f"{args.small_answers}")
    tokens = sum(len(a) for _, a in answers)
    print(f"[held out] {len(answers)} answers, {tokens} answer tokens")
    lm, tok, eos, pad = load_timed_lm(args.model, args.threads)
    if args.small:
        small, _ = load_lm(args.small)
        small_name = args.small
    else:
        backbone = ew.wrap_backbone(lm)
        found = find_drafter(backbone)
        if found is None:
            raise SystemExit(f"no drafter is shipped for {args.model}; give --small")
        small, small_name = with_shipped_drafter(backbone, found), "shipped"
    tuned, _ = load_lm(str(big))
    rows = {}
    bench_answers = None
    if args.acceptance_prompts:
        bench_answers = generate_answers(
            ew.wrap_backbone(lm), prompt_ids(tok, list(BENCH_PROMPTS)[: args.acceptance_prompts]),
            max_new_tokens=args.max_new_tokens, batch_size=8, eos_token_id=sorted(eos),
            pad_token_id=pad)
    drafters = {"small": (small_name, small, args.small_answers),
                "big": (str(big), tuned.eval(),
                        big_report["num_train"] + big_report["num_eval"])}
    for key, (name, model, n) in drafters.items():
        got = agreement_on_answers(model.eval(), answers)
        rows[key] = {"drafter": name, "answers": n, "agreement": got}
        print(f"[agreement] {name} ({n} answers): {got}")
        if args.acceptance_prompts:
            rows[key]["exit_acceptance"] = exit_acceptance(
                model, tok, list(BENCH_PROMPTS)[: args.acceptance_prompts],
                args.max_new_tokens, eos, pad)
            print(f"[exit acceptance] {name}: {rows[key]['exit_acceptance']}")
            rows[key]["bench_agreement"] = agreement_on_answers(model, bench_answers)
            print(f"[bench agreement] {name}: {rows[key]['bench_agreement']}")
    timed = None
    if not args.no_timing:
        common = dict(max_new_tokens=args.max_new_tokens, eos=eos, pad=pad)
        methods = [hf_method(lm, "hf_greedy", **common),
                   exitwise_method(lm, "exitwise_greedy", "exitwise_greedy", **common)]
        for key, (_, model, _) in drafters.items():
            e = int(model.exit_layers[0])
            for label, opts in (("ngram_auto", dict(draft_len="auto")),
                                ("ngram_1", dict(draft_len=1)),
                                ("ngram_1_tree_confidence", dict(draft_len=1,
                                                                 tree_width="confidence"))):
                methods.append(exitwise_method(model, f"{key}_{label}", "self_spec",
                                               exit_layer=e, ngram=4, **opts, **common))
        prompts = list(BENCH_PROMPTS)[: args.prompts]
        timed = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                 "threads": args.threads, "batch_size": 1, "repeats": args.repeats,
                 "methods": time_on_prompts(lm, tok, methods, prompts, args.repeats, eos)}
    report = {
        "benchmark": "lm_drafter_data",
        "command": "python benchmarks/lm_drafter_data.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "held_out": {"answers": len(answers), "answer_tokens": tokens,
                     "from": str(big), "past_first": args.small_answers},
        "benchmark_prompts": None if bench_answers is None else {
            "prompts": len(bench_answers),
            "answer_tokens": sum(len(a) for _, a in bench_answers)},
        "drafters": rows,
        "timed": timed,
    }
    return write_report(report, args.out)


if __name__ == "__main__":
    main()

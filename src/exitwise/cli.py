"""``exitwise`` command line. Thin: every sub-command calls one recipe function."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import ConfigError, ExitwiseError


def _json_default(o: Any) -> Any:
    return str(o)


def _layers(value: str) -> Any:
    if value == "all" or value.startswith("every:"):
        return value
    return [int(v) for v in value.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exitwise", description="Early-exit neural networks.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune an encoder with exit heads")
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--model", default="minilm", help="local path, hub id, or 'minilm'")
    t.add_argument("--data", default=None,
                   help="folder with train.tsv/dev.tsv (or s1/s2/labels.<split> files), a "
                        "TSV/CSV file, or a Hugging Face dataset id (glue/rte ...)")
    t.add_argument("--columns", default=None,
                   help="text[,second text],label columns by header name or 1-based position, "
                        "for files exitwise cannot read by itself (e.g. 8,9,10 for a "
                        "header-less STS-B); for a file with a header give names: positions "
                        "skip a first row only when its label field is a label column's name "
                        "or a name above numeric labels")
    t.add_argument("--split", default="train",
                   help="the split to train on (its held-out slice calibrates); e.g. dev for "
                        "a folder with only dev and test files")
    t.add_argument("--task", default=None, choices=["classification", "regression"],
                   help="default: from the labels (decimal numbers -> regression)")
    t.add_argument("--layers", type=_layers, default="all", help="'all', 'every:K' or '2,4,6'")
    t.add_argument("--final-head", default=None,
                   help="head of the final exit (default: --head, or the checkpoint's own "
                        "classifier where it fits the labels; given, a fresh head)")
    t.add_argument("--head", default=None,
                   help="exit head (default: chosen from the checkpoint: mean for "
                        "sentence-transformers mean pooling or an untrained pooler, pooler "
                        "when the checkpoint's pooler was trained)")
    t.add_argument("--strategy", default="joint")
    t.add_argument("--weights", default=None,
                   help="exit loss weights of joint (uniform, the default, or depth), or of "
                        "another strategy that takes them (ensemble_ic, past_future, "
                        "branchynet)")
    t.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the training strategy (repeatable; values read as "
                        "JSON), e.g. --strategy dact --option tau=0.01")
    t.add_argument("--epochs", type=_positive_float, default=None,
                   help="default: 1, or up to 3 on a small file (about 300 steps)")
    t.add_argument("--max-steps", type=int, default=-1)
    t.add_argument("--batch-size", type=_positive_int, default=32)
    t.add_argument("--lr", type=_positive_float, default=5e-5)
    t.add_argument("--max-train", type=int, default=None)
    t.add_argument("--holdout", type=int, default=None,
                   help="train rows kept for calibration (default: 2000, or a quarter of a "
                        "smaller file)")
    t.add_argument("--max-length", type=int, default=None,
                   help="tokens per example (default 64; 128 for sentence pairs)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-resume", action="store_true", help="start over instead of resuming")

    c = sub.add_parser("calibrate", help="fit temperatures and exit thresholds on held-out train")
    c.add_argument("model_dir")
    c.add_argument("--policies", default=None,
                   help="comma-separated (default: entropy, confidence, patience, "
                        "patience_confidence; patience only for a regression model; plus "
                        "the policy of a learned exit score the model has: lte, cats, dact)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--max-drop", type=float, default=None, help="accuracy drop target, points")
    g.add_argument("--budget", type=float, default=None, help="mean compute target, fraction")
    c.add_argument("--delta", type=_delta, default=0.1,
                   help="with --max-drop: certify the drop at level delta (the setting's upper "
                        "confidence bound stays within the target w.p. >= 1 - delta); 'none' "
                        "picks by the observed drop only")
    c.add_argument("--risk", default="drop", choices=["drop", "disagreement"],
                   help="what --delta certifies: the accuracy drop, or the share of rows "
                        "whose prediction differs from full depth")
    c.add_argument("--data", default=None)
    c.add_argument("--no-temperature", action="store_true")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("evaluate", help="per-exit accuracy, policies and curves on a split")
    e.add_argument("model_dir")
    e.add_argument("--data", default=None)
    e.add_argument("--split", default=None,
                   help="default: dev, or test for a model trained on dev")
    e.add_argument("--out", default=None, help="folder for report.json and the curves "
                                                "(default: MODEL_DIR/eval-SPLIT)")
    e.add_argument("--limit", type=_positive_int, default=None)
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    b = sub.add_parser("bench", help="measured wall-clock speed-up vs full depth")
    b.add_argument("model_dir")
    b.add_argument("--data", default=None)
    b.add_argument("--split", default=None,
                   help="default: dev, or test for a model trained on dev")
    b.add_argument("--batch-sizes", type=_positive_ints, default=[1, 32])
    b.add_argument("--repeats", type=_positive_int, default=5)
    b.add_argument("--limit", type=_positive_int, default=None)
    b.add_argument("--threads", type=_positive_int, default=2)
    b.add_argument("--out", default=None,
                   help="JSON report file (default: MODEL_DIR/bench-SPLIT.json)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")

    _add_lm_commands(sub)

    d = sub.add_parser(
        "demo", help="the whole story on the embedded defaults: SmolLM2 self-speculative "
                     "decoding (default, 'llm') or the MiniLM/SST-2 classifier ('classify')")
    d.add_argument("story", nargs="?", default="llm", choices=["llm", "classify"])
    d.add_argument("--out", default=None)
    d.add_argument("--data", default=None)
    d.add_argument("--max-train", type=int, default=8000)
    d.add_argument("--tune", action="store_true",
                   help="llm: tune a draft exit anew instead of the one shipped for SmolLM2")
    return p


def _draft_len(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _tree_width(value: str) -> int | str:
    return value if value == "confidence" else int(value)


def _token_policy(args: argparse.Namespace) -> dict[str, Any] | None:
    """``generate``'s early-exit policy: calm_softmax at 0.9 unless --policy / --threshold say
    otherwise; None for other strategies unless one of them is given (then refused there)."""
    if args.strategy != "early_exit" and args.policy is None and args.threshold is None \
            and args.classifier is None:
        return None
    name = args.policy or ("calm_learned" if args.classifier is not None else "calm_softmax")
    policy: dict[str, Any] = {"name": name}
    if _takes_threshold(name):
        policy["threshold"] = 0.9 if args.threshold is None else args.threshold
    elif args.threshold is not None:
        raise ConfigError(f"--policy {name} has no threshold; leave --threshold out")
    if args.classifier is not None:  # calm_learned's; the model folder's own by default
        if name != "calm_learned":
            raise ConfigError(f"--classifier is the calm_learned policy's; got --policy {name}")
        policy["classifier"] = args.classifier
    return policy


def _takes_threshold(policy: str) -> bool:
    """Whether the registered policy ``policy`` has a ``threshold`` (``never`` has none; an
    unknown name is refused with the registered ones)."""
    import inspect

    from .policies import POLICIES

    return "threshold" in inspect.signature(POLICIES.get(policy)).parameters


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """``generate``'s --temperature / --top-k / --top-p as given; refused without --sample,
    where greedy decoding would ignore them (the API ignores them, as HF's generate does)."""
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    given = {k: v for k, v in given.items() if v is not None}
    flags = [f"--{k.replace('_', '-')}" for k in given] + (["--seed"] if args.seed is not None
                                                            else [])
    if flags and not args.sample:
        raise ConfigError(f"{', '.join(flags)} only apply with --sample (greedy decoding has "
                          "no randomness to shape)")
    return given


def _draft_threshold(value: str) -> float | str:
    return value if value == "auto" else float(value)


def _delta(value: str) -> float | None:
    if value.strip().lower() in ("none", "off", ""):
        return None
    return float(value)


def _key_values(items: list[str]) -> dict[str, Any]:
    """["p_max=0.2", "kd=null"] -> {"p_max": 0.2, "kd": None} (values read as JSON, else
    kept as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option wants KEY=VALUE; got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, e.g. 1,32; got {value!r}") from None


def _positive(kind: type) -> Any:
    """An argparse type: a number of ``kind`` (int or float) above 0."""
    def parse(value: str) -> Any:
        try:
            out = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}; got {value!r}") from None
        if not out > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0; got {value!r}")
        return out
    return parse


_positive_int, _positive_float = _positive(int), _positive(float)


def _positive_ints(value: str) -> list[int]:
    """"1,32" -> [1, 32], each a whole number above 0 (repeats dropped, order kept)."""
    return list(dict.fromkeys(_positive_int(v) for v in value.split(",")))


def _skip(value: str) -> list[Any]:
    """"3,4,5:mlp,6:attn" -> [3, 4, (5, "mlp"), (6, "attn")]: blocks (both sub-layers) or
    block:part pairs, the forms ``strategy="layer_skip"`` takes (checked there)."""
    out: list[Any] = []
    for item in value.split(","):
        block, _, part = item.strip().partition(":")
        if not block.strip().isdigit() or part not in ("", "attn", "mlp"):
            raise argparse.ArgumentTypeError(
                f"--skip takes blocks and block:attn / block:mlp pairs, e.g. 3,4,5:mlp; "
                f"got {item!r}")
        out.append((int(block), part) if part else int(block))
    return out


#: the decoding strategies ``exitwise generate`` offers: every registered one (a test keeps
#: this list equal to the registry, which the parser does not import: torch loads slowly)
GENERATE_STRATEGIES = ("greedy", "self_speculative", "anpd", "layer_skip", "swift", "early_exit")


def _add_lm_commands(sub: Any) -> None:
    t = sub.add_parser("tune-lm", help="train a decoder LM's exits with one objective")
    t.add_argument("--model", default="smollm2", help="'smollm2', a local folder, or a hub id")
    t.add_argument("--objective", default="ce",
                   choices=["ce", "kl", "answers", "layerskip", "free", "calm"],
                   help="ce (EE-Tuning) / kl (distillation to the last layer) / calm (CALM's "
                        "classifier) on the model's own continuations; answers: cross-entropy "
                        "on its greedy answers (--answers N); layerskip / free: the whole "
                        "decoder")
    t.add_argument("--exit-layer", type=_ints, default=[8], help="depth(s), e.g. 8 or 6,12")
    t.add_argument("--adapter", default="mlp",
                   choices=["none", "norm", "mlp", "block", "kangaroo"])
    t.add_argument("--draft-vocab", type=int, default=None,
                   help="read out only the K most likely token ids at the exit (e.g. 8192)")
    t.add_argument("--conditioned", action="store_true",
                   help="feature-conditioned exits: they also read the full model's final state "
                        "at the previous position (objective 'answers')")
    # The objective's own options: only those given are passed, and the objective refuses
    # any it does not have (e.g. --epochs is an option of 'answers' only).
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--epochs", type=float, default=None, help="answers")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--seq-len", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the objective (JSON value), e.g. p_max=0.2")
    # Where the data come from.
    t.add_argument("--answers", type=int, default=256,
                   help="answers: how many prompts (built from local text) to answer")
    t.add_argument("--answer-tokens", type=int, default=128, help="answers: answer length")
    t.add_argument("--data-dir", default=None,
                   help="answers: folder with lm/wikitext2-*.txt, sst2/train.tsv, "
                        "lm/tinyshakespeare.txt (default: $EXITWISE_DATA or ../shared/data)")
    t.add_argument("--prompts-file", default=None,
                   help="the user turns to answer or continue (JSON list, or one per line) "
                        "instead of prompts built from local text")
    t.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1")
    t.add_argument("--answer-batch-size", type=int, default=32,
                   help="answers: prompts answered per batch (larger on a GPU)")
    t.add_argument("--generations", type=int, default=2,
                   help="other objectives: continuations per prompt")
    t.add_argument("--gen-tokens", type=int, default=96, help="other objectives")
    t.add_argument("--out", required=True, help="folder to write (a rerun resumes)")
    t.add_argument("--no-resume", action="store_true")

    g = sub.add_parser("generate", help="generate text (greedy, self-speculative, training-free "
                                        "drafts, early exit)")
    g.add_argument("model", help="a tune-lm folder, 'smollm2', a local folder or a hub id")
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--strategy", default="self_speculative", choices=GENERATE_STRATEGIES,
                   help="self_speculative (default: a tuned or shipped exit drafts); anpd, "
                        "layer_skip, swift: training-free drafts (n-grams of the text, the "
                        "model minus --skip, sub-layers skipped as SWIFT finds them); "
                        "early_exit: CALM-style, not lossless")
    g.add_argument("--exit-layer", type=int, default=None,
                   help="default: the tuned exit, or the drafter shipped for the model")
    g.add_argument("--draft-len", type=_draft_len, default=None,
                   help="an int, or 'auto' (chosen per step from measured costs); default: "
                        "self_speculative: the shipped drafter's, else 4; anpd, layer_skip, "
                        "swift: auto")
    g.add_argument("--ngram", type=int, default=None,
                   help="self_speculative: also draft from the text's n-grams up to this order "
                        "(0: off; default: the shipped drafter's, else off); anpd: the "
                        "largest order (default 4)")
    g.add_argument("--skip", type=_skip, default=None,
                   help="layer_skip (required there): what the draft leaves out, blocks or "
                        "block:attn / block:mlp, e.g. 3,4,5:mlp (blocks 1..L-2)")
    g.add_argument("--draft-threshold", type=_draft_threshold, default=None,
                   help="self_speculative, layer_skip, swift: stop a draft once its top-1 "
                        "probability is below this; layer_skip, swift: or 'auto' (adapted "
                        "as Draft & Verify does)")
    g.add_argument("--tree-width", type=_tree_width, default=None,
                   help="self_speculative, layer_skip, swift: verify token trees, each "
                        "draft with the draft's next TREE_WIDTH - 1 choices as siblings, or "
                        "'confidence' (SWIFT's count per depth from the draft's top-1 "
                        "probability; default 1)")
    g.add_argument("--kv", default=None, choices=["skip", "propagate", "recompute"],
                   help="early_exit: keys/values of skipped layers (default skip = computed "
                        "later, in parallel with the next token)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--policy", default=None,
                   help="early_exit: token exit policy (default calm_softmax)")
    g.add_argument("--threshold", type=float, default=None,
                   help="early_exit: policy threshold (default 0.9)")
    g.add_argument("--classifier", default=None,
                   help="early_exit with --policy calm_learned: the folder of its classifier "
                        "(default: the model folder's, as tune-lm --objective calm saves it)")
    g.add_argument("--sample", action="store_true",
                   help="sample from the full model's distribution instead of greedy "
                        "(lossless strategies by speculative rejection sampling)")
    g.add_argument("--temperature", type=float, default=None,
                   help="with --sample: divide the logits by this (> 0; default 1)")
    g.add_argument("--top-k", type=int, default=None,
                   help="with --sample: keep the k most likely tokens (default all)")
    g.add_argument("--top-p", type=float, default=None,
                   help="with --sample: keep the most likely tokens whose mass reaches this")
    g.add_argument("--seed", type=int, default=None, help="with --sample: reproducible draws")
    g.add_argument("--json", action="store_true", help="print texts and stats as JSON")
    g.add_argument("--kernels", default=None, choices=["auto", "stock", "streaming", "packed"],
                   help="few-row products: auto (default, or $EXITWISE_KERNELS) = stock unless "
                        "measured faster on this machine; stock; streaming; packed")

    k = sub.add_parser("kernels", help="measure now which few-row kernels this machine should "
                                       "use for a model (else measured at first use)")
    k.add_argument("model", help="a tune-lm folder, 'smollm2', a local folder or a hub id")
    k.add_argument("--rows", type=_ints, default=list(range(1, 9)),
                   help="row counts to measure (default 1..8, what generation reroutes)")
    k.add_argument("--threads", type=_positive_int, default=2)
    k.add_argument("--again", action="store_true",
                   help="forget this machine's earlier measurements first")


def _run_lm(args: argparse.Namespace) -> int:
    from .recipes import lm

    if args.command == "tune-lm":
        options = {name: getattr(args, name) for name in
                   ("steps", "epochs", "lr", "batch_size", "seq_len", "seed")
                   if getattr(args, name) is not None}
        options.update(_key_values(args.option))
        job = lm.TuneLMJob(
            out_dir=args.out, model=args.model, exit_layers=args.exit_layer, adapter=args.adapter,
            draft_vocab=args.draft_vocab, conditioned=args.conditioned,
            objective=args.objective, options=options,
            answers=args.answers, answer_tokens=args.answer_tokens, data_dir=args.data_dir,
            num_generations=args.generations, gen_tokens=args.gen_tokens,
            prompts_file=args.prompts_file, device=args.device,
            answer_batch_size=args.answer_batch_size,
        )
        report = lm.run_tune_lm(job, resume=not args.no_resume)
        print(json.dumps(report, indent=2, default=_json_default))
        print(f"saved to {args.out}")
    elif args.command == "generate":
        out = lm.run_generate(
            args.model, args.prompt, strategy=args.strategy, exit_layer=args.exit_layer,
            draft_len=args.draft_len, max_new_tokens=args.max_new_tokens,
            chat=False if args.no_chat else None, do_sample=args.sample, seed=args.seed,
            **_sampling_options(args),
            policy=_token_policy(args), kv=args.kv,
            draft_threshold=args.draft_threshold, kernels=args.kernels, ngram=args.ngram,
            tree_width=args.tree_width, skip=args.skip,
        )
        if args.json:
            print(json.dumps(out, indent=2, default=_json_default))
        else:
            for text in out["texts"]:
                print(text)
            s = out["stats"]
            print(f"[{s['strategy']}: {sum(out['new_tokens'])} tokens, acceptance "
                  f"{s['acceptance_rate']:.2f}, {s['layer_applications_per_token']:.1f} layer "
                  "applications/token]", file=sys.stderr)
    elif args.command == "kernels":
        import torch

        from .backbones import decoder_of
        from .backbones.kernels import autotune, default_tuner
        from .backbones.stack_probe import DecoderStackProbe
        from .machine import machine_key

        torch.set_num_threads(args.threads)
        model, _ = lm.load_lm(args.model, print_fn=lambda m: print(m, file=sys.stderr))
        tuner = default_tuner()
        if args.again:
            tuner.clear()
        backbone = decoder_of(model, "kernels")[0]
        probe = DecoderStackProbe(backbone, max_rows=max(args.rows))
        # the modules generate() reroutes (a tuned model's exit heads too), so the keys match
        decisions = autotune(model, backbone.model, rows=args.rows, tuner=tuner, probe=probe,
                             per_call=True)
        print(f"{machine_key()} (kept in {tuner.path})")
        print(f"{'weights (dtype:OUTxIN:count:rows) / whole pass':52s} {'stock ms':>9s} "
              f"{'alternative':>13s} {'ratio':>6s}  choice")
        for key, d in decisions.items():
            print(f"{key:52s} {d.stock_ms:9.3f} {d.streaming_ms:13.3f} {d.ratio:6.2f}  "
                  f"{d.kind if d.stream else 'stock'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ExitwiseError as err:
        print(f"exitwise: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        every = {"train": " (a checkpoint every 200 steps)",
                 "tune-lm": " (its last checkpoint: save_every steps apart)"}
        if args.command in every:
            print("exitwise: interrupted; run the same command again to continue from what "
                  f"it last saved{every[args.command]}", file=sys.stderr)
        else:  # these write their results at the end only
            print(f"exitwise: interrupted; {args.command} saved nothing of this run",
                  file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command in ("tune-lm", "generate", "kernels"):
        return _run_lm(args)
    if args.command == "demo" and args.story == "llm":
        import torch

        from .recipes.lm_demo import run_llm_demo

        torch.set_num_threads(2)
        run_llm_demo(out_dir=args.out or "runs/demo-llm", tune=args.tune)
        return 0
    from .recipes import report_tables as rt
    from .recipes import text_classification as tc
    from .recipes import text_evaluate as te

    if args.command == "train":
        options = _key_values(args.option)
        if args.weights is not None and args.strategy != "joint":  # the strategy's own option
            options.setdefault("weights", args.weights)
        joint_weights = args.weights if args.weights is not None and (
            args.strategy == "joint") else "uniform"
        job = tc.TrainJob(
            out_dir=args.out, model=args.model, data=args.data, layers=args.layers,
            head=args.head, final_head=args.final_head, strategy=args.strategy,
            weights=joint_weights,
            strategy_options=options, epochs=args.epochs,
            max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.lr,
            max_train=args.max_train, holdout=args.holdout, seed=args.seed,
            max_length=args.max_length, columns=args.columns, task=args.task,
            train_split=args.split,
        )
        tc.run_train(job, resume=not args.no_resume)
        print(f"saved to {args.out}")
    elif args.command == "calibrate":
        drop = args.max_drop if (args.max_drop is not None or args.budget is not None) else 1.0
        report = tc.run_calibrate(
            args.model_dir, policies=tuple(args.policies.split(",")) if args.policies else None,
            max_drop_points=None if args.budget is not None else drop, budget=args.budget,
            data=args.data, temperature=not args.no_temperature, delta=args.delta,
            risk=args.risk,
        )
        print(json.dumps(report, indent=2, default=_json_default) if args.json
              else rt.format_calibration(report))
    elif args.command == "evaluate":
        report = te.run_evaluate(args.model_dir, data=args.data, split=args.split,
                                 out_dir=args.out, limit=args.limit)
        print(json.dumps(report, indent=2, default=_json_default) if args.json
              else rt.format_evaluation(report))
    elif args.command == "bench":
        from pathlib import Path

        report = te.run_bench(
            args.model_dir, data=args.data, split=args.split,
            batch_sizes=tuple(args.batch_sizes),
            repeats=args.repeats, limit=args.limit, threads=args.threads,
        )
        default = te.report_path(args.model_dir, "bench", args.data, report["split"])
        out = Path(args.out) if args.out else default.parent / f"{default.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=_json_default))
        print(json.dumps(report, indent=2, default=_json_default) if args.json
              else f"{rt.format_bench(report)}\nreport: {out}")
    elif args.command == "demo":
        import torch

        from .recipes.demo import run_classify_demo

        torch.set_num_threads(2)
        run_classify_demo(out_dir=args.out or "runs/demo-classify", data=args.data,
                          max_train=args.max_train)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

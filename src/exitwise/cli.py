"""``exitwise`` command line. Thin: every sub-command calls one recipe function."""

from __future__ import annotations

import argparse
import json
import sys

from . import cli_args as ca
from .cli_lm import add_lm_commands, run_lm
from .errors import ExitwiseError


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
    t.add_argument("--layers", type=ca.layers, default="all", help="'all', 'every:K' or '2,4,6'")
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
    t.add_argument("--epochs", type=ca.positive_float, default=None,
                   help="default: 1, or up to 3 on a small file (about 300 steps)")
    t.add_argument("--max-steps", type=int, default=-1)
    t.add_argument("--batch-size", type=ca.positive_int, default=32)
    t.add_argument("--lr", type=ca.positive_float, default=5e-5)
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
    c.add_argument("--delta", type=ca.delta, default=0.1,
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
    e.add_argument("--limit", type=ca.positive_int, default=None)
    e.add_argument("--json", action="store_true", help="print the report as JSON")

    b = sub.add_parser("bench", help="measured wall-clock speed-up vs full depth")
    b.add_argument("model_dir")
    b.add_argument("--data", default=None)
    b.add_argument("--split", default=None,
                   help="default: dev, or test for a model trained on dev")
    b.add_argument("--batch-sizes", type=ca.positive_ints, default=[1, 32])
    b.add_argument("--repeats", type=ca.positive_int, default=5)
    b.add_argument("--limit", type=ca.positive_int, default=None)
    b.add_argument("--threads", type=ca.positive_int, default=2)
    b.add_argument("--out", default=None,
                   help="JSON report file (default: MODEL_DIR/bench-SPLIT.json)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")

    add_lm_commands(sub)

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
        return run_lm(args)
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
        options = ca.key_values(args.option)
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
        print(json.dumps(report, indent=2, default=ca.json_default) if args.json
              else rt.format_calibration(report))
    elif args.command == "evaluate":
        report = te.run_evaluate(args.model_dir, data=args.data, split=args.split,
                                 out_dir=args.out, limit=args.limit)
        print(json.dumps(report, indent=2, default=ca.json_default) if args.json
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
        out.write_text(json.dumps(report, indent=2, default=ca.json_default))
        print(json.dumps(report, indent=2, default=ca.json_default) if args.json
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

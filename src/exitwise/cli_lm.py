"""The ``exitwise`` command line's decoder-LM commands: ``tune-lm``, ``generate``, ``kernels``
(:mod:`exitwise.cli` adds them to its parser and hands them their parsed arguments)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import cli_args as ca
from .errors import ConfigError


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


def add_lm_commands(sub: Any) -> None:
    t = sub.add_parser("tune-lm", help="train a decoder LM's exits with one objective")
    t.add_argument("--model", default="smollm2", help="'smollm2', a local folder, or a hub id")
    t.add_argument("--objective", default="ce",
                   choices=["ce", "kl", "answers", "layerskip", "free", "calm"],
                   help="ce (EE-Tuning) / kl (distillation to the last layer) / calm (CALM's "
                        "classifier) on the model's own continuations; answers: cross-entropy "
                        "on its greedy answers (--answers N); layerskip / free: the whole "
                        "decoder")
    t.add_argument("--exit-layer", type=ca.ints, default=[8], help="depth(s), e.g. 8 or 6,12")
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
    k.add_argument("--rows", type=ca.ints, default=list(range(1, 9)),
                   help="row counts to measure (default 1..8, what generation reroutes)")
    k.add_argument("--threads", type=ca.positive_int, default=2)
    k.add_argument("--again", action="store_true",
                   help="forget this machine's earlier measurements first")


def run_lm(args: argparse.Namespace) -> int:
    from .recipes import lm

    if args.command == "tune-lm":
        options = {name: getattr(args, name) for name in
                   ("steps", "epochs", "lr", "batch_size", "seq_len", "seed")
                   if getattr(args, name) is not None}
        options.update(ca.key_values(args.option))
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
        print(json.dumps(report, indent=2, default=ca.json_default))
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
            print(json.dumps(out, indent=2, default=ca.json_default))
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

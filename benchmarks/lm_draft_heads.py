"""Which draft-head form drafts best from a shallow exit: the exit adapters tuned the same way
on the same answers, compared on held-out answers and on the benchmark prompts.

    python benchmarks/lm_draft_heads.py \
        --answers-from benchmarks/work/lm_speed/smollm2-e2-mlp-v4096-a2400x6-cond --answers 1200

Every variant is an exit at ``--exit-layer`` of SmolLM2 with a 4,096-token draft vocabulary,
tuned by ``exitwise.tune_exits`` with the ``answers`` objective (the shipped drafter's recipe:
6 epochs, batch 16; lr 3e-3 for the MLP heads as shipped, the objective's default 1e-3 for
the attention adapters) on the first ``--answers`` of the model's own greedy answers cached by
a ``tune-lm`` run (``greedy_answers.json``), so all see the same answers and the same
held-out split:

- ``mlp_conditioned``: the shipped form (residual MLP, reads the previous position's final
  state);
- ``mlp``: the same MLP, no condition;
- ``kangaroo``: Kangaroo's adapter (one attention layer over the context + own norm), fresh
  as in the reference (exitwise's default since this benchmark);
- ``kangaroo_warm``: the same adapter started from the last block's attention and the final
  norm (exitwise's default before);
- ``block``: EE-Tuning's adapter, a copy of the last decoder block (attention + MLP).

Three probes of EAGLE's idea (a draft layer that attends over the context *and* reads the
full model's final features), built here on top of the library's heads because exitwise's
conditioned exits take only the ``none`` / ``norm`` / ``mlp`` adapters (:mod:`exitwise.heads.lm`);
they are measured by agreement only, never decoded:

- ``block_conditioned`` / ``kangaroo_conditioned``: the ``block`` / ``kangaroo`` adapter given
  the condition (a zero-initialized ``fuse`` of the previous position's final state, added
  before the attention, as a conditioned MLP head adds it), so at each position the attention
  reads every earlier position's shallow state *and* the final state before it;
- ``mlp_attn_conditioned``: the shipped form (conditioned MLP) followed by Kangaroo's attention
  sub-layer with its output projection at zero and its norm a copy of the model's final norm,
  so it starts exactly as the shipped form (no worse before tuning).

Deviations from EAGLE's draft model (reference ``eagle/model/cnets.py``: ``fc(cat(embed(x),
f))`` over each position's token embedding and the target model's feature f, then one
decoder layer, trained with a feature-regression loss beside the token loss, and chained on
its own predicted features): here the token enters as its state after the exit's blocks, the
feature through the zero-initialized ``fuse`` (a sum, not a concatenation), the loss is the
``answers`` objective's cross-entropy alone, and only one-token drafts are measured.

Reported per variant: held-out agreement (the share of held-out answer tokens whose one-token
draft equals the answer's: the expected acceptance of drafts of one, measured as the tuning
objective measures it), the same teacher-forced agreement on the full model's greedy answers
to the benchmark prompts (``BENCH_PROMPTS``, 128 tokens), trainable parameters and tuning
seconds. No timing of decoding: this compares what the heads draft, not how fast.
Resumable: each finished variant is written to the report at once and skipped on a rerun
(a report whose variants were tuned with other settings is refused, not mixed);
tuning checkpoints go to ``--work`` (default ``benchmarks/work/lm_draft_heads/``).
-> ``benchmarks/results/lm_draft_heads.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import exitwise as ew  # noqa: E402
from exitwise.heads.lm import LMHead  # noqa: E402
from exitwise.lm import AnswersConfig, agreement_on_answers, generate_answers  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import ANSWERS_NAME, load_lm, prompt_ids  # noqa: E402


def warm_start(head, backbone) -> None:
    """Kangaroo's adapter as exitwise built it before: the last block's attention weights and
    the final norm (its feed-forward stays removed)."""
    last = backbone.blocks[backbone.num_layers - 1].state_dict()
    mine = head.block.state_dict()
    with torch.no_grad():
        head.block.load_state_dict({k: last[k] for k in mine}, strict=True)
        head.norm.load_state_dict(backbone.norm.state_dict())


def add_condition(head, backbone) -> None:
    """Give an attention-adapter head the feature condition: the zero-initialized ``fuse`` a
    conditioned head adds before its adapter (``LMHead._transform`` applies it when present)."""
    ref = backbone.lm_head.weight
    head.fuse = nn.Linear(head.in_features, head.in_features).to(ref.device, ref.dtype)
    nn.init.zeros_(head.fuse.weight)
    nn.init.zeros_(head.fuse.bias)
    head.conditioned = True


def add_context_attention(head, backbone) -> None:
    """After a conditioned MLP head's MLP, Kangaroo's attention sub-layer (``h + attn(norm(h))``,
    fresh) with its output projection at zero, and the model's final norm as the head's own
    norm: the head starts exactly as the conditioned MLP it was built as."""
    probe = LMHead(head.in_features, head.num_labels, adapter="kangaroo",
                   draft_vocab=head.draft_vocab, backbone=backbone)
    out = probe.block.self_attn.o_proj  # Llama-style blocks (SmolLM2, the model measured)
    with torch.no_grad():
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()
        probe.norm.load_state_dict(backbone.norm.state_dict())
    head.block, head.norm = probe.block, probe.norm
    head.cache_index, head.layer_type = probe.cache_index, probe.layer_type


# variant -> (head_kwargs, learning rate, what is done to the head after it is attached)
VARIANTS: dict[str, tuple[dict, float, Callable | None]] = {
    "mlp_conditioned": ({"adapter": "mlp", "conditioned": True}, 3e-3, None),
    "mlp": ({"adapter": "mlp"}, 3e-3, None),
    "kangaroo": ({"adapter": "kangaroo"}, 1e-3, None),
    "kangaroo_warm": ({"adapter": "kangaroo"}, 1e-3, warm_start),
    "block": ({"adapter": "block"}, 1e-3, None),
    "block_conditioned": ({"adapter": "block"}, 1e-3, add_condition),
    "kangaroo_conditioned": ({"adapter": "kangaroo"}, 1e-3, add_condition),
    "mlp_attn_conditioned": ({"adapter": "mlp", "conditioned": True}, 3e-3,
                             add_context_attention),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers-from", required=True,
                    help="a tune-lm folder whose greedy_answers.json supplies the answers")
    ap.add_argument("--answers", type=int, default=1200)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--exit-layer", type=int, default=2)
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "benchmarks/work/lm_draft_heads"),
                    help="tuning checkpoints, one folder per variant (a rerun resumes them)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_draft_heads.json"))
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    settings = {"model": args.model, "exit_layer": args.exit_layer,
                "draft_vocab": args.draft_vocab, "epochs": args.epochs, "batch_size": 16,
                "answers": args.answers}
    differ = {k: (report[k], v) for k, v in settings.items() if k in report and report[k] != v}
    report.update({
        "command": "python benchmarks/lm_draft_heads.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "threads": args.threads, **settings,
    })
    variants = report.setdefault("variants", {})

    items = json.loads((Path(args.answers_from) / ANSWERS_NAME).read_text())["items"]
    if len(items) < args.answers:
        raise SystemExit(f"{args.answers_from} holds {len(items)} answers, not {args.answers}")
    answers = [(list(map(int, p)), list(map(int, a))) for p, a in items[: args.answers]]
    if report.get("variants") and differ:  # a resumed report holds one setting only
        raise SystemExit(f"{out} holds variants tuned with other settings {differ} "
                         "(recorded, asked); give another --out")
    lm, tok = load_lm(args.model)
    lm.eval()
    eos = [int(tok.eos_token_id)]
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else eos[0])
    bench = generate_answers(ew.wrap_backbone(lm),
                             prompt_ids(tok, list(BENCH_PROMPTS)),
                             max_new_tokens=128, batch_size=8, eos_token_id=eos,
                             pad_token_id=pad)
    report["benchmark_prompts"] = len(bench)
    report["benchmark_answer_tokens"] = sum(len(a) for _, a in bench)
    vocab = int(lm.config.vocab_size)

    for name in args.variants.split(","):
        if name in variants:
            print(f"[{name}] done before: {variants[name]}")
            continue
        kwargs, lr, build = VARIANTS[name]
        config = ew.ExitConfig(layers=[args.exit_layer], head="lm", num_labels=vocab,
                               head_kwargs={**kwargs, "draft_vocab": args.draft_vocab},
                               final_head_kwargs={})
        model = ew.attach_exits(lm, config)
        head = model.heads[0]
        if build is not None:
            build(head, model.backbone)
        t0 = time.time()
        result = ew.tune_exits(
            model, answers, AnswersConfig(epochs=args.epochs, lr=lr, batch_size=16),
            output_dir=Path(args.work) / name)
        seconds = time.time() - t0
        model.eval()
        row = {
            "command": report["command"],  # the report's own is the last run's only
            "head_kwargs": kwargs, "lr": lr, "warm_start": build is warm_start,
            "built_by": None if build is None else build.__name__,
            "trainable_parameters": sum(p.numel() for p in head.parameters()),
            "tuning_seconds": seconds,
            "held_out_agreement": result.after[args.exit_layer],
            "held_out_before": result.before[args.exit_layer],
            "bench_agreement": agreement_on_answers(model, bench)[args.exit_layer],
        }
        variants[name] = row
        print(f"[{name}] {row}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))  # each variant kept as it finishes
    print(f"[done] {out}")
    return report


if __name__ == "__main__":
    main()

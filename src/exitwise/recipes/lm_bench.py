"""Measured decoding speed of a decoder LM: plain HF greedy, HF's own early-exit assistant
(``assistant_early_exit``), and exitwise self-speculative decoding with tuned exits.

All methods run in one process on the same formatted prompts, interleaved per prompt chunk
(every method runs on chunk c, back to back, before chunk c+1; a repetition is one pass over
all chunks), so drift and other load hit all methods alike; per method the median over
repetitions of tokens/s is reported, the median over chunks of greedy-time / method-time, and
(from the first repetition) the share of
prompts whose tokens equal plain HF greedy's at the same batch size, and exitwise's counters
(acceptance rate, layer applications and sequential block calls per token).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

from ..calibration.ltt import sequence_losses
from ..errors import ConfigError
from ..generation import generate
from ..lm.prompts import BENCH_PROMPTS, CALIBRATION_PROMPTS  # noqa: F401  (re-exported)
from .lm import encode_prompts, eos_ids, format_prompts, hf_model, load_lm, new_token_lists

Config = tuple[int, int, float | None]

# ``never_slower`` in the summary: exitwise's greedy with its default kernels at least this
# close to its greedy on stock kernels (the same decoding, timed back to back), per batch size.
NEVER_SLOWER_TOLERANCE = 0.02


def parse_configs(configs: Sequence[Any]) -> list[Config]:
    """``"E:D"`` or ``"E:D:T"`` strings (or tuples) -> (exit layer, draft length, draft
    confidence threshold or None)."""
    out: list[Config] = []
    for c in configs:
        if isinstance(c, str):
            parts = c.split(":")
            try:
                if len(parts) not in (2, 3):
                    raise ValueError
                c = (int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) == 3 else None)
            except ValueError:
                raise ConfigError(
                    f"bad config {c!r}; write EXIT:DRAFT_LEN or EXIT:DRAFT_LEN:THRESHOLD, "
                    "e.g. 8:4 or 6:6:0.5"
                ) from None
        c = tuple(c)
        out.append((int(c[0]), int(c[1]), None if len(c) < 3 or c[2] is None else float(c[2])))
    if not out:
        raise ConfigError("give at least one (exit_layer, draft_len) config")
    return out


def _config_name(c: Config) -> str:
    return f"{c[0]}:{c[1]}" + ("" if c[2] is None else f":{c[2]:g}")


def _runner(
    model: Any, kind: str, exit_layer: int | None, draft_len: int | None, max_new_tokens: int,
    eos: set[int], pad: int, policy: Any = None, kv: str = "skip",
    draft_threshold: float | None = None, kernels: str | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict | None]]:
    """A function (ids, mask) -> (sequences, exitwise stats dict or None) for one method."""
    lm = hf_model(model)
    if kind == "exitwise_greedy":
        def run_greedy(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
            out = generate(
                model, ids, mask, max_new_tokens=max_new_tokens, kernels=kernels,
                eos_token_id=sorted(eos) or None, pad_token_id=pad,
            )
            return out.sequences, out.stats.to_dict()

        return run_greedy
    if kind == "calm":
        def run_calm(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
            out = generate(
                model, ids, mask, strategy="early_exit", policy=policy, kv=kv,
                max_new_tokens=max_new_tokens, eos_token_id=sorted(eos) or None,
                pad_token_id=pad, kernels=kernels,
            )
            return out.sequences, out.stats.to_dict()

        return run_calm
    if kind == "self_spec":
        def run(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
            out = generate(
                model, ids, mask, strategy="self_speculative", exit_layer=exit_layer,
                draft_len=draft_len, max_new_tokens=max_new_tokens,
                eos_token_id=sorted(eos) or None, pad_token_id=pad,
                draft_threshold=draft_threshold, kernels=kernels,
            )
            return out.sequences, out.stats.to_dict()

        return run
    gen_config = lm.generation_config.__class__.from_dict(lm.generation_config.to_dict())
    gen_config.do_sample = False
    gen_config.max_new_tokens = max_new_tokens
    gen_config.pad_token_id = pad
    gen_config.eos_token_id = sorted(eos) or None
    if kind == "hf_assistant":
        gen_config.assistant_early_exit = exit_layer
        gen_config.num_assistant_tokens = draft_len
        gen_config.num_assistant_tokens_schedule = "constant"  # exactly draft_len per step
        gen_config.assistant_confidence_threshold = 0.0  # never stop a draft early
    elif kind != "hf_greedy":
        raise ConfigError(f"unknown method kind {kind!r}")

    def run_hf(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        with torch.inference_mode():
            seqs = lm.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
        return seqs, None

    return run_hf


def _merge_stats(parts: list[dict]) -> dict[str, float]:
    """Batch-level exitwise counters summed over chunks -> rates."""
    drafted = sum(p["total_drafted"] for p in parts)
    accepted = sum(p["total_accepted"] for p in parts)
    decoded = sum(p["decoded_tokens"] for p in parts)
    rows_decoded = sum(p["decoded_tokens"] / max(len(p["new_tokens"]), 1) for p in parts)
    return {
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "layer_applications_per_token": (
            sum(p["layer_applications"] for p in parts) / max(decoded, 1)
        ),
        "sequential_layers_per_token": (
            sum(p["sequential_layers"] for p in parts) / max(rows_decoded, 1)
        ),
    }


def bench_lm(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] = BENCH_PROMPTS,
    max_new_tokens: int = 128,
    configs: Sequence[Any] = ((8, 4),),
    batch_sizes: Sequence[int] = (1, 4),
    repeats: int = 3,
    hf_assistant: bool = True,
    assistant_configs: Sequence[Any] | None = None,
    chat: bool | None = None,
    threads: int | None = None,
    calm: dict[str, Any] | None = None,
    calm_kv: str = "skip",
    calm_batch_sizes: Sequence[int] = (1,),
    exitwise_greedy: bool = True,
    stock_configs: Sequence[Any] = (),
    assistant_prompts: int | None = None,
    print_fn: Any = print,
) -> dict[str, Any]:
    """Time every method on ``prompts`` at each batch size; returns the report (see module doc).

    ``exitwise_greedy``: also time exitwise's own greedy decoding with the default kernels
    (the same as its self-speculative decoding, so ``self_spec / exitwise_greedy`` is the gain
    of speculation alone) and with ``kernels="stock"`` (``exitwise_greedy_stock``: the default
    must never be slower); ``stock_configs``: self-speculative configs to time again on stock ``nn.Linear``
    kernels (``kernels="stock"``), which shows what the few-row kernels contribute.
    ``assistant_prompts``: run HF's assistant only on the first this many prompts (it is
    slow on a CPU); self-speculative entries then add ``vs_hf_assistant_same_prompts``.

    ``calm``: name -> token-level exit policy (e.g. certified ``calm_softmax`` thresholds), run
    as CALM early-exit decoding with ``kv=calm_kv`` at ``calm_batch_sizes``; these are lossy, so
    their entries add ``token_consistency`` (1 - the mean per-prompt share of positions that
    differ from plain greedy).

    ``model``: a ``MultiExitModel`` with tuned ``lm`` exits at the configs' exit layers, or a
    plain causal LM (self-speculative then drafts through the shared LM head). HF's assistant
    runs at batch 1 only (``assistant_early_exit`` supports no larger batch), at
    ``assistant_configs`` (default: every config; on CPU it can be far slower than greedy).
    """
    if threads:
        torch.set_num_threads(threads)
    if repeats < 1 or max_new_tokens < 1:
        raise ConfigError("repeats and max_new_tokens must be >= 1")
    pairs = parse_configs(configs)
    stock_pairs = parse_configs(stock_configs) if stock_configs else []
    assist_pairs = pairs if assistant_configs is None else parse_configs(assistant_configs)
    lm = hf_model(model)
    device = lm.get_output_embeddings().weight.device
    num_layers = int(lm.config.num_hidden_layers)
    eos = eos_ids(lm, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    texts = format_prompts(tokenizer, prompts, chat)
    report: dict[str, Any] = {
        "num_prompts": len(texts), "max_new_tokens": max_new_tokens, "repeats": repeats,
        "threads": torch.get_num_threads(), "num_layers": num_layers,
        "configs": [_config_name(p) for p in pairs], "batch_sizes": {},
    }
    for bs in batch_sizes:
        chunks = [encode_prompts(tokenizer, texts[s : s + bs], device)
                  for s in range(0, len(texts), bs)]
        assistant_chunks = (
            len(chunks) if assistant_prompts is None else -(-assistant_prompts // bs)
        )
        methods: list[tuple[str, str, int | None, int | None]] = [
            ("hf_greedy", "hf_greedy", None, None)
        ]
        kernel_of: dict[str, str] = {}
        if exitwise_greedy:  # the default kernels, and the stock ones beside them
            methods.append(("exitwise_greedy", "exitwise_greedy", None, None))
            methods.append(("exitwise_greedy_stock", "exitwise_greedy", None, None))
            kernel_of["exitwise_greedy_stock"] = "stock"
        thresholds: dict[str, float | None] = {}
        if hf_assistant and bs == 1:
            methods += [(f"hf_assistant@{e}:{d}", "hf_assistant", e, d)
                        for e, d, _ in assist_pairs]
        for c in pairs:
            name = f"self_spec@{_config_name(c)}"
            methods.append((name, "self_spec", c[0], c[1]))
            thresholds[name] = c[2]
        for c in stock_pairs:  # the same decoding on stock nn.Linear kernels
            name = f"self_spec_stock@{_config_name(c)}"
            methods.append((name, "self_spec", c[0], c[1]))
            thresholds[name] = c[2]
            kernel_of[name] = "stock"
        runners = {n: _runner(model, k, e, d, max_new_tokens, eos, pad,
                              draft_threshold=thresholds.get(n),
                              kernels=kernel_of.get(n))
                   for n, k, e, d in methods}
        for cname, cpolicy in (calm or {}).items() if bs in calm_batch_sizes else ():
            methods.append((f"calm@{cname}", "calm", None, None))
            runners[f"calm@{cname}"] = _runner(
                model, "calm", None, None, max_new_tokens, eos, pad, policy=cpolicy, kv=calm_kv
            )
        for run in runners.values():  # warm-up: first-call allocations out of the timings
            run(*encode_prompts(tokenizer, texts[:1], device))
        # Interleaved at the finest grain: for every prompt chunk, every method runs once,
        # back to back, so machine noise hits all methods alike. A repetition is one pass over
        # all chunks; a method's time is its summed time over the chunks of that pass.
        times: dict[str, list[float]] = {n: [] for n in runners}
        chunk_times: dict[str, list[float]] = {n: [] for n in runners}  # first pass, per chunk
        tokens: dict[str, list[list[int]]] = {n: [] for n in runners}
        stats: dict[str, list[dict]] = {n: [] for n in runners}
        for r in range(repeats):
            spent = {n: 0.0 for n in runners}
            for c, (ids, mask) in enumerate(chunks):
                for name, run in runners.items():
                    if name.startswith("hf_assistant@") and c >= assistant_chunks:
                        continue  # HF's assistant runs on the first chunks only
                    t0 = time.perf_counter()
                    seq, st = run(ids, mask)
                    dt = time.perf_counter() - t0
                    spent[name] += dt
                    if r == 0:
                        chunk_times[name].append(dt)
                        tokens[name].extend(new_token_lists(seq.cpu(), ids.shape[1], eos))
                        if st is not None:
                            stats[name].append(st)
            for name in runners:
                times[name].append(spent[name])
            print_fn(f"  batch {bs}, repetition {r + 1}/{repeats} done")
        counts = {n: sum(len(t) for t in tokens[n]) for n in runners}
        ref = tokens["hf_greedy"]
        entries = {}
        for name, _, e, d in methods:
            med = statistics.median(times[name])
            entry: dict[str, Any] = {
                "exit_layer": e, "draft_len": d, "seconds_median": med,
                "seconds": times[name], "new_tokens": counts[name],
                "num_prompts": len(tokens[name]),
                "tokens_per_s": counts[name] / med,
                # zip stops at the method's own prompts (HF's assistant: the first chunks)
                "exact_match": sum(a == b for a, b in zip(tokens[name], ref)) / len(tokens[name]),
                # per chunk: greedy's time / this method's time (same chunk, back to back);
                # equal token counts make it the tokens/s ratio for lossless methods
                "median_chunk_speedup_vs_greedy": statistics.median(
                    g / t for g, t in zip(chunk_times["hf_greedy"], chunk_times[name])
                ),
            }
            if name.startswith("calm@"):
                losses = sequence_losses(tokens[name], ref, "token")
                entry["token_consistency"] = 1.0 - sum(losses) / len(losses)
                depths = [d for st in stats[name] for row in st["token_depths"] for d in row]
                entry["mean_exit_depth"] = sum(depths) / max(len(depths), 1)
                entry["early_exit_rate"] = sum(d < num_layers for d in depths) / max(len(depths), 1)
            if stats[name]:
                entry.update(_merge_stats(stats[name]))
                if name.startswith("calm@"):
                    entry.pop("acceptance_rate")  # nothing is drafted
            elif name == "hf_greedy":
                entry.update(layer_applications_per_token=float(num_layers),
                             sequential_layers_per_token=float(num_layers))
            entries[name] = entry
        if any(n.startswith("hf_assistant@") for n in runners):
            # Self-speculative vs HF's assistant on exactly the prompts both ran (first pass):
            # the ratio of their summed times there (both lossless: the same tokens).
            for name in runners:
                if name.startswith("self_spec"):
                    n_chunks = min(assistant_chunks, len(chunks))
                    mine = sum(chunk_times[name][:n_chunks])
                    entries[name]["vs_hf_assistant_same_prompts"] = {
                        a: sum(chunk_times[a][:n_chunks]) / mine
                        for a in runners if a.startswith("hf_assistant@")
                    }
        report["batch_sizes"][str(bs)] = entries
    report["summary"] = summarize(report)
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: batch 1 (best self-speculative config vs HF greedy and vs HF's best
    assistant) and the best self-speculative config at batch 4 vs HF greedy at batch 4."""
    def best(entries: dict[str, Any], prefix: str) -> tuple[str | None, dict | None]:
        cands = [(n, e) for n, e in entries.items() if n.startswith(prefix)]
        return max(cands, key=lambda x: x[1]["tokens_per_s"]) if cands else (None, None)

    out: dict[str, Any] = {}
    b1 = report["batch_sizes"].get("1")
    if b1:
        greedy = b1["hf_greedy"]["tokens_per_s"]
        name, spec = best(b1, "self_spec@")
        aname, assist = best(b1, "hf_assistant@")
        out.update(
            hf_greedy_tps=greedy,
            hf_assistant_tps=assist["tokens_per_s"] if assist else None,
            hf_assistant_config=aname,
            hf_assistant_exact_match=assist["exact_match"] if assist else None,
            self_spec_config=name,
            self_spec_tps=spec["tokens_per_s"] if spec else None,
            self_spec_exact_match=spec["exact_match"] if spec else None,
            self_spec_acceptance_rate=spec.get("acceptance_rate") if spec else None,
            speedup_vs_greedy=spec["tokens_per_s"] / greedy if spec else None,
            speedup_vs_hf_assistant=(
                spec.get("vs_hf_assistant_same_prompts", {}).get(aname)
                or spec["tokens_per_s"] / assist["tokens_per_s"] if spec and assist else None
            ),
            hf_assistant_prompts=assist["num_prompts"] if assist else None,
            median_chunk_speedup_vs_greedy=(
                spec["median_chunk_speedup_vs_greedy"] if spec else None
            ),
        )
        own = b1.get("exitwise_greedy")
        if own:  # speculation alone: the same kernels on both sides
            out["exitwise_greedy_tps"] = own["tokens_per_s"]
            out["speedup_vs_exitwise_greedy"] = (
                spec["tokens_per_s"] / own["tokens_per_s"] if spec else None
            )
        stock = b1.get(f"self_spec_stock@{name[len('self_spec@'):]}") if name else None
        if stock:
            out["self_spec_stock_kernels_tps"] = stock["tokens_per_s"]
    calm = {n: e for n, e in (b1 or {}).items() if n.startswith("calm@")}
    if calm:
        out["calm"] = {
            n: {"tokens_per_s": e["tokens_per_s"],
                "speedup_vs_greedy": e["tokens_per_s"] / b1["hf_greedy"]["tokens_per_s"],
                "token_consistency": e["token_consistency"], "exact_match": e["exact_match"],
                "mean_exit_depth": e["mean_exit_depth"]}
            for n, e in calm.items()
        }
    # The default kernel choice against stock kernels and against HF, per batch size.
    kernels: dict[str, Any] = {}
    for bs, entries in report["batch_sizes"].items():
        auto, stock_g = entries.get("exitwise_greedy"), entries.get("exitwise_greedy_stock")
        if auto and stock_g:
            kernels[bs] = {
                "default_vs_stock_greedy": auto["tokens_per_s"] / stock_g["tokens_per_s"],
                "default_vs_hf_greedy": (
                    auto["tokens_per_s"] / entries["hf_greedy"]["tokens_per_s"]),
                "stock_vs_hf_greedy": (
                    stock_g["tokens_per_s"] / entries["hf_greedy"]["tokens_per_s"]),
            }
    if kernels:
        out["greedy_kernels"] = kernels
        out["never_slower_tolerance"] = NEVER_SLOWER_TOLERANCE
        out["never_slower"] = all(
            k["default_vs_stock_greedy"] >= 1.0 - NEVER_SLOWER_TOLERANCE for k in kernels.values()
        )
    b4 = report["batch_sizes"].get("4")
    if b4:
        name4, spec4 = best(b4, "self_spec@")
        out["batch4_self_spec_config"] = name4
        out["batch4_speedup_vs_greedy"] = (
            spec4["tokens_per_s"] / b4["hf_greedy"]["tokens_per_s"] if spec4 else None
        )
        out["batch4_self_spec_exact_match"] = spec4["exact_match"] if spec4 else None
        own4 = b4.get("exitwise_greedy")
        if own4 and spec4:
            out["batch4_speedup_vs_exitwise_greedy"] = (
                spec4["tokens_per_s"] / own4["tokens_per_s"]
            )
    return out


def run_bench_lm(
    model_or_dir: str, prompts: Sequence[str] | None = None, limit: int | None = None,
    print_fn: Any = print, **kwargs: Any,
) -> dict[str, Any]:
    """:func:`bench_lm` on a tuned folder or a model name (the ``bench-lm`` command)."""
    model, tokenizer = load_lm(model_or_dir, print_fn=print_fn)
    chosen = list(prompts or BENCH_PROMPTS)[: limit or None]
    return bench_lm(model, tokenizer, chosen, print_fn=print_fn, **kwargs)

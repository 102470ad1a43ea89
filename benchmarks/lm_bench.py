"""Decoding methods timed side by side: the harness of the LM benchmarks, and a command.

    python benchmarks/lm_bench.py runs/smol-e2 --configs 2:1,2:2 --batch-sizes 1,4

Each method is a :class:`Method`: a name, what it is (the reference, lossless or lossy) and a
``run(ids, mask) -> (sequences, exitwise stats or None)`` call. :func:`bench_lm` encodes the
prompts in chunks of each batch size and, for every repetition and chunk, runs every method
once, back to back, in an order rotated per chunk (``exitwise.runtime.timing.rotation``), so
machine noise hits all methods alike and none always runs first. A method's time in a
repetition is its summed time over the chunks; its figure is the median over repetitions.
Tokens of the first repetition are compared with HF greedy (``exact_match``, and for lossy
methods ``token_consistency``).

The report holds every method's entry per batch size and a ``summary``: per batch size the
best self-speculative configuration against HF greedy and against exitwise's own greedy,
plus the batch-1 headline (vs HF's early-exit assistant too) and the kernel check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(ROOT / "src"))

from exitwise.backbones.special_tokens import eos_ids  # noqa: E402
from exitwise.calibration.ltt import sequence_losses  # noqa: E402
from exitwise.errors import ConfigError  # noqa: E402
from exitwise.generation import generate  # noqa: E402
from exitwise.lm.prompts import BENCH_PROMPTS  # noqa: E402
from exitwise.recipes.lm import (  # noqa: E402
    hf_model,
    load_lm,
    new_token_lists,
    prompt_batch,
)
from exitwise.runtime.timing import rotation  # noqa: E402

Config = tuple[int, int, "float | None"]
Run = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict | None]"]

# The tolerance of ``never_slower`` (every automatic drafter at least this close to exitwise's
# greedy on stock kernels) and of ``greedy_kernels_never_slower`` (exitwise's greedy with its
# default kernels against the same on stock ones), both timed back to back per batch size.
NEVER_SLOWER_TOLERANCE = 0.02


@dataclass
class Method:
    """One way of decoding. kind: "reference" (HF greedy), "lossless" or "lossy";
    family: "hf_greedy", "hf_assistant", "exitwise_greedy", "self_spec", "calm";
    max_chunks: time it on the first this many chunks only (HF's assistant is slow)."""

    name: str
    kind: str
    family: str
    run: Run
    exit_layer: int | None = None
    draft_len: int | None = None
    max_chunks: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


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
                    "e.g. 8:4 or 6:6:0.5") from None
        c = tuple(c)
        out.append((int(c[0]), int(c[1]), None if len(c) < 3 or c[2] is None else float(c[2])))
    if not out:
        raise ConfigError("give at least one (exit_layer, draft_len) config")
    return out


def config_name(c: Config) -> str:
    return f"{c[0]}:{c[1]}" + ("" if c[2] is None else f":{c[2]:g}")


# -- the methods ---------------------------------------------------------------------------
def hf_method(model: Any, name: str, max_new_tokens: int, eos: set[int], pad: int,
              exit_layer: int | None = None, draft_len: int | None = None,
              max_chunks: int | None = None) -> Method:
    """HF greedy ``generate``, or with ``exit_layer`` HF's early-exit assistant."""
    lm = hf_model(model)
    config = lm.generation_config.__class__.from_dict(lm.generation_config.to_dict())
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.pad_token_id = pad
    config.eos_token_id = sorted(eos) or None
    if exit_layer is not None:
        config.assistant_early_exit = exit_layer
        config.num_assistant_tokens = draft_len
        config.num_assistant_tokens_schedule = "constant"  # exactly draft_len per step
        config.assistant_confidence_threshold = 0.0  # never stop a draft early

    def run(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        with torch.inference_mode():
            return lm.generate(input_ids=ids, attention_mask=mask, generation_config=config), None

    if exit_layer is None:
        return Method(name, "reference", "hf_greedy", run)
    return Method(name, "lossless", "hf_assistant", run, exit_layer, draft_len, max_chunks)


def exitwise_method(model: Any, name: str, family: str, max_new_tokens: int, eos: set[int],
                    pad: int, **options: Any) -> Method:
    """exitwise's ``generate`` with a strategy and its options (family: exitwise_greedy,
    self_spec or calm)."""
    strategy = options.pop("strategy", None) or {
        "exitwise_greedy": "greedy", "self_spec": "self_speculative", "calm": "early_exit"}[family]

    def run(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        out = generate(model, ids, mask, strategy=strategy, max_new_tokens=max_new_tokens,
                       eos_token_id=sorted(eos) or None, pad_token_id=pad, **options)
        return out.sequences, out.stats.to_dict()

    kind = "lossy" if family == "calm" else "lossless"
    return Method(name, kind, family, run, options.get("exit_layer"), options.get("draft_len"),
                  info={k: v for k, v in options.items() if k != "policy"})


def parse_drafters(specs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Named lossless drafters beyond the fixed (exit, draft length) configs:

    ``anpd`` / ``anpd:D``: n-gram drafts alone (ANPD), draft length D or "auto";
    ``auto@E``: exit E's drafts, draft length chosen per step ("auto");
    ``ngram@E:D``: exit E's drafts of D with n-gram drafts where the text predicts them;
    ``ngram@E:auto``: the same with automatic lengths;
    ``fixed@E:D``: exit E's drafts of D;
    ``swift`` / ``swift:D``: SWIFT, the model minus blocks it chooses while decoding (no exit),
    draft length D or "auto" (its search goes on across the prompts and repetitions).
    A suffix ``/wW`` on an exit drafter verifies token trees of width W (each draft with the
    exit's next W - 1 choices as sibling leaves), e.g. ``auto@2/w3``; ``/wc``: SWIFT's widths
    per depth from the exit's top-1 probability (``tree_width="confidence"``).
    """
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        body, _, width = spec.partition("/w")
        kind, _, arg = body.partition("@")
        try:
            if kind.startswith("swift") and not width and not arg:
                d = kind.partition(":")[2] or "auto"
                out[spec] = {"strategy": "swift", "draft_len": d if d == "auto" else int(d)}
            elif kind.startswith("anpd") and not width:
                d = kind.partition(":")[2] or "auto"
                out[spec] = {"strategy": "anpd", "draft_len": d if d == "auto" else int(d)}
            elif kind == "auto":
                out[spec] = {"strategy": "self_speculative", "exit_layer": int(arg),
                             "draft_len": "auto"}
            elif kind in ("ngram", "fixed"):
                e, _, d = arg.partition(":")
                out[spec] = {"strategy": "self_speculative", "exit_layer": int(e),
                             "draft_len": d if d == "auto" else int(d)}
                if kind == "ngram":
                    out[spec]["ngram"] = 4
            else:
                raise ValueError
            if width:
                out[spec]["tree_width"] = "confidence" if width == "c" else int(width)
        except ValueError:
            raise ConfigError(f"bad drafter {spec!r}; write anpd, anpd:D, swift, swift:D, auto@E, "
                              "ngram@E:D, ngram@E:auto or fixed@E:D, optionally with /wW or /wc"
                              ) from None
    return out


def build_methods(model: Any, bs: int, pairs: list[Config], stock_pairs: list[Config],
                  assist_pairs: list[Config], calm: dict[str, Any], calm_kv: str,
                  calm_batch_sizes: Sequence[int], exitwise_greedy: bool, hf_assistant: bool,
                  assistant_chunks: int, max_new_tokens: int, eos: set[int],
                  pad: int, drafters: dict[str, dict[str, Any]] | None = None) -> list[Method]:
    common = dict(max_new_tokens=max_new_tokens, eos=eos, pad=pad)
    methods = [hf_method(model, "hf_greedy", **common)]
    if exitwise_greedy:  # the default kernels, and the stock ones beside them
        methods.append(exitwise_method(model, "exitwise_greedy", "exitwise_greedy", **common))
        methods.append(exitwise_method(model, "exitwise_greedy_stock", "exitwise_greedy",
                                       kernels="stock", **common))
    if hf_assistant and bs == 1:  # HF's assistant supports batch 1 only
        methods += [hf_method(model, f"hf_assistant@{e}:{d}", exit_layer=e, draft_len=d,
                              max_chunks=assistant_chunks, **common)
                    for e, d, _ in assist_pairs]
    for prefix, chosen, kernels in (("self_spec", pairs, None),
                                    ("self_spec_stock", stock_pairs, "stock")):
        for c in chosen:
            methods.append(exitwise_method(
                model, f"{prefix}@{config_name(c)}", "self_spec", exit_layer=c[0],
                draft_len=c[1], draft_threshold=c[2], kernels=kernels, **common))
    for name, options in (drafters or {}).items():
        methods.append(exitwise_method(model, f"draft@{name}", "self_spec", **dict(options),
                                       **common))
    if bs in calm_batch_sizes:
        for name, policy in calm.items():
            methods.append(exitwise_method(model, f"calm@{name}", "calm", policy=policy,
                                           kv=calm_kv, **common))
    return methods


# -- timing --------------------------------------------------------------------------------
def merge_stats(parts: list[dict]) -> dict[str, float]:
    """Batch-level exitwise counters summed over chunks -> rates."""
    drafted = sum(p["total_drafted"] for p in parts)
    accepted = sum(p["total_accepted"] for p in parts)
    decoded = sum(p["decoded_tokens"] for p in parts)
    rows_decoded = sum(p["decoded_tokens"] / max(len(p["new_tokens"]), 1) for p in parts)
    siblings = sum(p.get("sibling_accepted", 0) for p in parts)
    ngram_drafted = sum(p.get("ngram_drafted", 0) for p in parts)
    return {
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        # of the accepted tokens, those that were token-tree siblings (0 for chains)
        "sibling_share": siblings / accepted if accepted else 0.0,
        "ngram_acceptance_rate": (sum(p.get("ngram_accepted", 0) for p in parts)
                                  / ngram_drafted if ngram_drafted else None),
        # a layer-skipping draft model's sub-layers count as half a block each
        "layer_applications_per_token": (
            sum(p["layer_applications"] + p.get("draft_sublayer_applications", 0) / 2
                for p in parts) / max(decoded, 1)),
        "sequential_layers_per_token": sum(p["sequential_layers"] for p in parts) / max(
            rows_decoded, 1),
    }


def time_methods(methods: list[Method], chunks: list[tuple[torch.Tensor, torch.Tensor]],
                 repeats: int, eos: set[int], print_fn: Any = print,
                 label: str = "") -> dict[str, dict[str, Any]]:
    """Per method: summed seconds per repetition, per-chunk seconds of the first repetition,
    its tokens and exitwise stats (first repetition)."""
    out = {m.name: {"seconds": [], "chunk_seconds": [], "tokens": [], "stats": []}
           for m in methods}
    step = 0
    for r in range(repeats):
        spent = {m.name: 0.0 for m in methods}
        for c, (ids, mask) in enumerate(chunks):
            for m in rotation(methods, step):
                if m.max_chunks is not None and c >= m.max_chunks:
                    continue
                t0 = time.perf_counter()
                seq, st = m.run(ids, mask)
                dt = time.perf_counter() - t0
                spent[m.name] += dt
                if r == 0:
                    rec = out[m.name]
                    rec["chunk_seconds"].append(dt)
                    rec["tokens"].extend(new_token_lists(seq.cpu(), ids.shape[1], eos))
                    if st is not None:
                        rec["stats"].append(st)
            step += 1
        for m in methods:
            out[m.name]["seconds"].append(spent[m.name])
        print_fn(f"  {label}repetition {r + 1}/{repeats} done")
    return out


def time_on_prompts(model: Any, tokenizer: Any, methods: list[Method], prompts: Sequence[str],
                    repeats: int, eos: set[int]) -> dict[str, dict[str, Any]]:
    """Each method at batch 1 on ``prompts`` (chat template), interleaved per prompt: the
    report entry of each (first method: the reference, "hf_greedy"), with its
    ``speedup_vs_hf_greedy``; the entries are printed."""
    chunks = [prompt_batch(tokenizer, [p], "cpu") for p in prompts]
    timed = time_methods(methods, chunks, repeats, eos)
    ref = timed["hf_greedy"]
    num_layers = model.config.num_hidden_layers
    entries = {m.name: entry_of(m, timed[m.name], ref, num_layers) for m in methods}
    base = entries["hf_greedy"]["tokens_per_s"]
    for name, e in entries.items():
        e["speedup_vs_hf_greedy"] = e["tokens_per_s"] / base
        print(f"{name:22s} {e['tokens_per_s']:7.2f} tok/s  {e['speedup_vs_hf_greedy']:.2f}x HF "
              f"greedy  exact {e['exact_match']:.2f}  acceptance {e.get('acceptance_rate')}")
    return entries


def batch1_parser(doc: str | None, out: Path) -> argparse.ArgumentParser:
    """An argument parser with the options the batch-1 drafting benchmarks share: --model
    (SmolLM2-135M-Instruct), --prompts (8), --max-new-tokens (128), --repeats (1), --threads
    (2) and --out (default ``out``); each benchmark adds its own."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(out))
    return ap


def load_timed_lm(name: str, threads: int) -> tuple[Any, Any, set[int], int]:
    """(model, tokenizer, eos ids, pad id) of ``name``, with torch set to ``threads``."""
    torch.set_num_threads(threads)
    lm, tok = load_lm(name)
    eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return lm, tok, eos, pad


def write_report(report: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """Write ``report`` as JSON to ``out`` (folders made as needed); return it."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"[done] {path}")
    return report


def entry_of(m: Method, rec: dict[str, Any], ref: dict[str, Any], num_layers: int) -> dict:
    """The report entry of one method from its timings and tokens."""
    med = statistics.median(rec["seconds"])
    tokens, count = rec["tokens"], sum(len(t) for t in rec["tokens"])
    entry: dict[str, Any] = {
        "kind": m.kind, "exit_layer": m.exit_layer, "draft_len": m.draft_len,
        "seconds_median": med, "seconds": rec["seconds"], "new_tokens": count,
        "num_prompts": len(tokens), "tokens_per_s": count / med,
        # zip stops at the method's own prompts (HF's assistant: the first chunks)
        "exact_match": sum(a == b for a, b in zip(tokens, ref["tokens"])) / len(tokens),
        # per chunk: greedy's time / this method's (same chunk, back to back)
        "median_chunk_speedup_vs_greedy": statistics.median(
            g / t for g, t in zip(ref["chunk_seconds"], rec["chunk_seconds"])),
    }
    if m.family == "calm":
        losses = sequence_losses(tokens, ref["tokens"], "token")
        entry["token_consistency"] = 1.0 - sum(losses) / len(losses)
        depths = [d for st in rec["stats"] for row in st["token_depths"] for d in row]
        entry["mean_exit_depth"] = sum(depths) / max(len(depths), 1)
        entry["early_exit_rate"] = sum(d < num_layers for d in depths) / max(len(depths), 1)
    if rec["stats"]:
        entry.update(merge_stats(rec["stats"]))
        if m.family == "calm":
            entry.pop("acceptance_rate")  # nothing is drafted
    elif m.family == "hf_greedy":
        entry.update(layer_applications_per_token=float(num_layers),
                     sequential_layers_per_token=float(num_layers))
    return entry


def bench_lm(
    model: Any, tokenizer: Any, prompts: Sequence[str] = BENCH_PROMPTS,
    max_new_tokens: int = 128, configs: Sequence[Any] = ((8, 4),),
    batch_sizes: Sequence[int] = (1, 4), repeats: int = 3, hf_assistant: bool = True,
    assistant_configs: Sequence[Any] | None = None, chat: bool | None = None,
    threads: int | None = None, calm: dict[str, Any] | None = None, calm_kv: str = "skip",
    calm_batch_sizes: Sequence[int] = (1,), exitwise_greedy: bool = True,
    stock_configs: Sequence[Any] = (), assistant_prompts: int | None = None,
    print_fn: Any = print, drafters: Sequence[str] = (),
) -> dict[str, Any]:
    """Time every method on ``prompts`` at each batch size; returns the report (module doc).

    configs: self-speculative (exit, draft length[, draft threshold]) configurations;
    stock_configs: some of them again on stock ``nn.Linear`` kernels; exitwise_greedy: time
    exitwise's greedy with the default and with stock kernels (speculation alone, and the
    kernel check); hf_assistant / assistant_configs / assistant_prompts: HF's early-exit
    assistant (batch 1 only; on the first ``assistant_prompts`` prompts); calm: name ->
    token-level exit policy, run as early-exit decoding (``calm_kv``) at ``calm_batch_sizes``;
    drafters: named lossless drafters (:func:`parse_drafters`), reported as ``draft@NAME``.
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
    texts = list(prompts)
    report: dict[str, Any] = {
        "num_prompts": len(texts), "max_new_tokens": max_new_tokens, "repeats": repeats,
        "threads": torch.get_num_threads(), "num_layers": num_layers,
        "configs": [config_name(p) for p in pairs], "drafters": list(drafters),
        "batch_sizes": {},
    }
    for bs in batch_sizes:
        chunks = [prompt_batch(tokenizer, texts[s : s + bs], device, chat)
                  for s in range(0, len(texts), bs)]
        assistant_chunks = len(chunks) if assistant_prompts is None else -(
            -assistant_prompts // bs)
        methods = build_methods(model, bs, pairs, stock_pairs, assist_pairs, calm or {},
                                calm_kv, calm_batch_sizes, exitwise_greedy, hf_assistant,
                                assistant_chunks, max_new_tokens, eos, pad,
                                parse_drafters(drafters))
        for m in methods:  # warm-up: first-call allocations out of the timings
            m.run(*prompt_batch(tokenizer, texts[:1], device, chat))
        recs = time_methods(methods, chunks, repeats, eos, print_fn, f"batch {bs}, ")
        ref = recs["hf_greedy"]
        entries = {m.name: entry_of(m, recs[m.name], ref, num_layers) for m in methods}
        assistants = [m.name for m in methods if m.family == "hf_assistant"]
        if assistants:
            # Self-speculative vs HF's assistant on exactly the prompts both ran (first
            # repetition): the ratio of their summed times there (both lossless).
            n = min(assistant_chunks, len(chunks))
            for m in methods:
                if m.family == "self_spec" and m.name.startswith("self_spec@"):
                    mine = sum(recs[m.name]["chunk_seconds"][:n])
                    entries[m.name]["vs_hf_assistant_same_prompts"] = {
                        a: sum(recs[a]["chunk_seconds"][:n]) / mine for a in assistants}
        report["batch_sizes"][str(bs)] = entries
    report["summary"] = summarize(report)
    return report


# -- the summary ---------------------------------------------------------------------------
def _best(entries: dict[str, Any], prefix: str) -> tuple[str | None, dict | None]:
    cands = [(n, e) for n, e in entries.items() if n.startswith(prefix)]
    return max(cands, key=lambda x: x[1]["tokens_per_s"]) if cands else (None, None)


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Per batch size, the best self-speculative configuration against HF greedy and against
    exitwise's greedy; the headline at the smallest batch size (also vs HF's assistant); the
    default kernels against stock ones per batch size."""
    out: dict[str, Any] = {"per_batch_size": {}}
    for bs, entries in report["batch_sizes"].items():
        greedy = entries["hf_greedy"]["tokens_per_s"]
        name, spec = _best(entries, "self_spec@")
        own = entries.get("exitwise_greedy")
        row: dict[str, Any] = {"hf_greedy_tps": greedy, "self_spec_config": name}
        if spec:
            row.update(self_spec_tps=spec["tokens_per_s"], exact_match=spec["exact_match"],
                       acceptance_rate=spec.get("acceptance_rate"),
                       speedup_vs_hf_greedy=spec["tokens_per_s"] / greedy)
            if own:
                row["speedup_vs_exitwise_greedy"] = spec["tokens_per_s"] / own["tokens_per_s"]
        if own:
            row["exitwise_greedy_tps"] = own["tokens_per_s"]
        out["per_batch_size"][bs] = row
    first = min(report["batch_sizes"], key=int)
    b1 = report["batch_sizes"][first]
    greedy = b1["hf_greedy"]["tokens_per_s"]
    name, spec = _best(b1, "self_spec@")
    aname, assist = _best(b1, "hf_assistant@")
    out.update(
        headline_batch_size=int(first), hf_greedy_tps=greedy,
        hf_assistant_tps=assist["tokens_per_s"] if assist else None,
        hf_assistant_config=aname,
        hf_assistant_exact_match=assist["exact_match"] if assist else None,
        self_spec_config=name, self_spec_tps=spec["tokens_per_s"] if spec else None,
        self_spec_exact_match=spec["exact_match"] if spec else None,
        self_spec_acceptance_rate=spec.get("acceptance_rate") if spec else None,
        speedup_vs_greedy=spec["tokens_per_s"] / greedy if spec else None,
        speedup_vs_hf_assistant=(
            spec.get("vs_hf_assistant_same_prompts", {}).get(aname)
            or spec["tokens_per_s"] / assist["tokens_per_s"] if spec and assist else None),
        hf_assistant_prompts=assist["num_prompts"] if assist else None,
        median_chunk_speedup_vs_greedy=spec["median_chunk_speedup_vs_greedy"] if spec else None,
    )
    own = b1.get("exitwise_greedy")
    if own:  # speculation alone: the same kernels on both sides
        out["exitwise_greedy_tps"] = own["tokens_per_s"]
        out["speedup_vs_exitwise_greedy"] = spec["tokens_per_s"] / own["tokens_per_s"] if (
            spec) else None
    stock = b1.get(f"self_spec_stock@{name[len('self_spec@'):]}") if name else None
    if stock:
        out["self_spec_stock_kernels_tps"] = stock["tokens_per_s"]
    calm = {n: e for n, e in b1.items() if n.startswith("calm@")}
    if calm:
        out["calm"] = {
            n: {"tokens_per_s": e["tokens_per_s"],
                "speedup_vs_greedy": e["tokens_per_s"] / greedy,
                "token_consistency": e["token_consistency"], "exact_match": e["exact_match"],
                "mean_exit_depth": e["mean_exit_depth"]}
            for n, e in calm.items()}
    kernels: dict[str, Any] = {}
    for bs, entries in report["batch_sizes"].items():
        auto, stock_g = entries.get("exitwise_greedy"), entries.get("exitwise_greedy_stock")
        if auto and stock_g:
            hf = entries["hf_greedy"]["tokens_per_s"]
            kernels[bs] = {
                "default_vs_stock_greedy": auto["tokens_per_s"] / stock_g["tokens_per_s"],
                "default_vs_hf_greedy": auto["tokens_per_s"] / hf,
                "stock_vs_hf_greedy": stock_g["tokens_per_s"] / hf,
            }
    if kernels:
        out["greedy_kernels"] = kernels
        out["never_slower_tolerance"] = NEVER_SLOWER_TOLERANCE
        out["greedy_kernels_never_slower"] = all(
            k["default_vs_stock_greedy"] >= 1.0 - NEVER_SLOWER_TOLERANCE
            for k in kernels.values())
    out.update(lossless_summary(report))
    return out


def _is_lossless_exitwise(name: str) -> bool:
    return name.startswith(("self_spec@", "draft@"))


def lossless_summary(report: dict[str, Any]) -> dict[str, Any]:
    """``best_lossless`` per batch size (the fastest exitwise lossless method: tokens/s,
    speed-up vs HF greedy and vs exitwise greedy, acceptance, exact match) and
    ``never_slower``: every automatic configuration (draft length "auto") at least as fast
    as exitwise's greedy on stock kernels, within the tolerance, at every batch size."""
    best: dict[str, Any] = {}
    auto_ok: list[bool] = []
    auto_ratios: dict[str, dict[str, float]] = {}
    for bs, entries in report["batch_sizes"].items():
        cands = [(n, e) for n, e in entries.items() if _is_lossless_exitwise(n)]
        if not cands:
            continue
        name, e = max(cands, key=lambda x: x[1]["tokens_per_s"])
        own = entries.get("exitwise_greedy")
        best[bs] = {
            "method": name, "tokens_per_s": e["tokens_per_s"],
            "speedup_vs_greedy": e["tokens_per_s"] / entries["hf_greedy"]["tokens_per_s"],
            "speedup_vs_exitwise_greedy": (
                e["tokens_per_s"] / own["tokens_per_s"] if own else None),
            "acceptance": e.get("acceptance_rate"), "exact_match": e["exact_match"],
        }
        stock = entries.get("exitwise_greedy_stock")
        for n, a in cands:
            if a.get("draft_len") == "auto" and stock:
                r = a["tokens_per_s"] / stock["tokens_per_s"]
                auto_ratios.setdefault(bs, {})[n] = r
                auto_ok.append(r >= 1.0 - NEVER_SLOWER_TOLERANCE)
    out: dict[str, Any] = {}
    if best:
        first = min(best, key=int)
        out["best_lossless"] = best[first]
        out["best_lossless_per_batch_size"] = best
    if auto_ok:
        out["auto_vs_stock_greedy"] = auto_ratios
        out["never_slower"] = all(auto_ok)
    return out


# -- the command ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a tune-lm folder, 'smollm2', a local folder or a hub id")
    p.add_argument("--configs", default="8:4", help="EXIT:DRAFT_LEN[:THRESHOLD] list")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="first N built-in prompts")
    p.add_argument("--no-hf-assistant", action="store_true")
    p.add_argument("--stock-configs", default=None,
                   help="configs to time again on stock nn.Linear kernels")
    p.add_argument("--drafters", default="",
                   help="named lossless drafters (anpd, anpd:D, auto@E, ngram@E:D, ngram@E:auto, "
                        "fixed@E:D; /wW: token trees of width W; /wc: SWIFT's widths)")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the report to this JSON file")
    args = p.parse_args(argv)
    model, tokenizer = load_lm(args.model)
    report = bench_lm(
        model, tokenizer, list(BENCH_PROMPTS)[: args.limit or None],
        max_new_tokens=args.max_new_tokens, configs=args.configs.split(","),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], repeats=args.repeats,
        hf_assistant=not args.no_hf_assistant, chat=False if args.no_chat else None,
        threads=args.threads,
        stock_configs=args.stock_configs.split(",") if args.stock_configs else (),
        drafters=[d for d in args.drafters.split(",") if d])
    print(json.dumps(report["summary"], indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

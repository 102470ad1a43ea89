"""Ship a tuned draft exit with the package (``src/exitwise/assets/drafters/NAME/``).

    python benchmarks/ship_drafter.py benchmarks/work/lm_speed/smollm2-e2-mlp-v4096-a2400x6-cond \
        --name smollm2-135m-instruct --draft-len auto --ngram 4 \
        --bench benchmarks/results/lm_drafter_data.json --bench-method big_ngram_auto

Reads a folder written by ``benchmarks/lm_speed.py`` (or ``exitwise tune-lm``): its tuned exit
heads over the base model. Writes the heads as the library saves them (``exit_config.json``,
``exit_heads.safetensors``; the backbone is never copied) and ``drafter.json``: the base
model's fingerprint (:func:`exitwise.generation.shipped.fingerprint`), the exit layer, the decoding
options ``generate(..., strategy="self_speculative")`` then uses by default, and the
provenance: the tuning job and report, and with ``--bench`` the benchmark's measured figures
for those options. ``generate`` finds the drafter by the fingerprint, so it is used on exactly
the weights it was tuned for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from exitwise.generation.shipped import ASSETS, DRAFTER_FILE, fingerprint  # noqa: E402
from exitwise.recipes.lm import load_lm  # noqa: E402


def bench_figures(path: Path, method: str) -> dict:
    """The benchmark's entries for ``method`` at every batch size, and its command (a report of
    ``lm_speed.py`` or, batch 1 only, of ``lm_drafter_data.py``)."""
    report = json.loads(path.read_text())
    out = {"file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
           "command": report.get("command"), "method": method, "per_batch_size": {}}
    sizes = report.get("batch_sizes", {})
    if report.get("benchmark") == "lm_drafter_data":  # batch 1, its own method names
        sizes = {"1": report["timed"]["methods"]}
    for bs, entries in sizes.items():
        e = entries.get(method)
        if e is None:
            continue
        hf = entries["hf_greedy"]["tokens_per_s"]
        out["per_batch_size"][bs] = {
            "tokens_per_s": e["tokens_per_s"], "speedup_vs_hf_greedy": e["tokens_per_s"] / hf,
            "exact_match": e["exact_match"], "acceptance_rate": e.get("acceptance_rate")}
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tuned", help="a folder with tuned exits (lm_speed.py --work, tune-lm --out)")
    p.add_argument("--name", required=True, help="folder name under the package's drafters")
    p.add_argument("--exit-layer", type=int, default=None,
                   help="the exit to draft with (default: the folder's shallowest)")
    p.add_argument("--draft-len", default="auto", help="an int or 'auto'")
    p.add_argument("--ngram", type=int, default=0, help="n-gram order for combined drafts "
                   "(0: exit drafts only)")
    p.add_argument("--bench", default=None, help="the benchmark JSON that measured them")
    p.add_argument("--bench-method", default=None,
                   help="its method name (default: draft@ngram@E:D or draft@auto@E)")
    p.add_argument("--dest", default=str(ASSETS))
    args = p.parse_args(argv)

    tuned = Path(args.tuned)
    model, _ = load_lm(str(tuned))
    exits = [int(d) for d in model.exit_layers[:-1]]
    e = args.exit_layer if args.exit_layer is not None else min(exits)
    if e not in exits:
        raise SystemExit(f"{tuned} has exits {exits}, not {e}")
    draft_len = args.draft_len if args.draft_len == "auto" else int(args.draft_len)
    options = {"draft_len": draft_len, **({"ngram": args.ngram} if args.ngram else {})}
    dest = Path(args.dest) / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("exit_config.json", "exit_heads.safetensors"):
        shutil.copyfile(tuned / name, dest / name)
    source: dict = {"command": " ".join(["python", "benchmarks/ship_drafter.py", *sys.argv[1:]])
                    if argv is None else "ship_drafter.main(...)"}
    for name, key in (("lm_recipe.json", "tuning_job"), ("tuning_report.json", "tuning")):
        if (tuned / name).is_file():
            source[key] = json.loads((tuned / name).read_text())
    if args.bench:
        method = args.bench_method or (
            f"draft@ngram@{e}:{draft_len}" if args.ngram else f"draft@auto@{e}")
        source["benchmark"] = bench_figures(Path(args.bench).resolve(), method)
    meta = {"fingerprint": fingerprint(model.backbone), "exit_layer": e, "options": options,
            "source": source}
    (dest / DRAFTER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"shipped exit {e} of {tuned} to {dest} with options {options}")
    return dest


if __name__ == "__main__":
    main()

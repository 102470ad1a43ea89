"""UEE-UCB under domain shift: a MiniLM-L6 multi-exit classifier trained on SST-2 learns
online, without labels, at which exit a stream of Movie Review (MR) sentences should stop.

    python benchmarks/nlp_stream.py                  # cache, replay sweep, live check, timing
    python benchmarks/nlp_stream.py --skip-timing    # everything but the wall-clock part

Method: Hari Narayan N U et al., "Unsupervised Early Exit in DNNs with Multiple Exits" (2022),
as implemented in :mod:`exitwise.policies.uee_ucb` (reference notebook MLiONS/MutiExitDNNs,
``Part2_UEE_UCB_Algorithm_Evaluation.ipynb``). Steps:

1. load the arena's SST-2 ``joint`` model (an exit after each of the 6 layers; ``--model-dir``:
   the arena's work folder, or one trained apart with ``nlp_methods.py --tasks sst2 --methods
   pcee_bert --skip-timing --work benchmarks/work/nlp_stream_model --out /tmp/x.json``, which
   trains the same recipe without touching the arena's report), read every MR
   sentence (labels only score the runs), cache every exit's logits once in ``--work``;
2. per cost weight ``mu`` (``depth_costs(..., scale=mu)``: exit at depth d costs
   ``mu * d / 6`` error-rate units; the reference's CS-1 is ``mu = 1``) and alpha 1 (the
   reference's), replay the stream one decision per sentence in ``stream_order(N, seed)``
   order per seed; report accuracy, depth, FLOPs ratio, the arm played most in the last 20%,
   every fixed exit, the best fixed exit in hindsight (by the reference's objective
   error + cost, and by the label-free reward UCB maximises) and the reference's regret;
3. run the real executor (``run_stream``) on the first ``--live-rows`` rows of the seed-0
   stream and check it plays the same arms and predicts the same classes as the replay;
4. time (skippable) ``run_stream`` at batch 1 on the last ``--timing-rows`` rows of the seed-0
   stream, its selector resumed from the replayed state of the earlier rows (steady state,
   not exploration), against the plain full-depth model, interleaved, median of ``--repeats``;
5. write ``benchmarks/results/nlp_stream.json`` and ``docs/benchmarks/nlp_stream.md``.

The MR files are read here (``read_mr``): the library's data module reads tables and
``s1/labels`` line files, not one file per class.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from exitwise.analysis import ExitLogitsCache, collect_exit_logits
from exitwise.analysis.stream import replay_stream
from exitwise.data import TextExamples
from exitwise.errors import DataError
from exitwise.machine import machine_info
from exitwise.policies.uee_ucb import UCBExitSelector, depth_costs
from exitwise.recipes import text_classification as tc
from exitwise.recipes import text_evaluate as te
from exitwise.runtime.online import run_stream, stream_order
from exitwise.runtime.timing import time_interleaved

MUS = (0.0, 0.01, 0.02, 0.05, 0.1, 1.0)
SEEDS = (0, 1, 2)
TAIL = 0.2  # the last fifth of the stream shows where UCB settled
BEST_WITHIN = 1.0  # accuracy points below the final exit that still count as "no loss"
CLAIM_TOLERANCE = 0.01  # per-sample regret, in error-rate units (1 point of error)


# -- pure helpers (tested in tests/test_nlp_stream_bench.py) ---------------------------------
def read_mr(folder: str | Path) -> TextExamples:
    """Movie Review: ``rt-polarity.pos`` (label 1, SST-2's "positive") then ``.neg`` (0), one
    sentence per line; blank lines are skipped."""
    texts: list[str] = []
    labels: list[int] = []
    for name, label in (("rt-polarity.pos", 1), ("rt-polarity.neg", 0)):
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{path} not found (MR as rt-polarity.pos / .neg)")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                texts.append(line.strip())
                labels.append(label)
    return TextExamples(texts, labels, str(folder), columns="rt-polarity.pos=1, .neg=0")


def fixed_exit_scores(preds: torch.Tensor, labels: torch.Tensor,
                      costs: list[float]) -> dict[str, list[float]]:
    """Every exit played on every row. preds: (N, E) class ids; labels: (N,); costs: (E,).

    accuracy_j; disagreement_j = P(yhat_j != yhat_0); reward_j = disagreement_j + c_0 - c_j
    (UEE-UCB's label-free mean reward, higher is better); objective_j = (1 - accuracy_j) + c_j
    (the reference's ``score``, lower is better, needs labels)."""
    acc = (preds == labels[:, None]).double().mean(0)
    dis = (preds != preds[:, :1]).double().mean(0)
    c = torch.tensor(costs, dtype=torch.float64)
    return {"accuracy": acc.tolist(), "disagreement": dis.tolist(),
            "reward": (dis + c[0] - c).tolist(), "objective": (1 - acc + c).tolist()}


def dominance_violations(correct: torch.Tensor) -> float:
    """Fraction of rows breaking strong dominance: some exit right and a deeper one wrong.
    correct: (N, E) bool."""
    if correct.shape[1] < 2:
        return 0.0
    right_before = torch.cummax(correct.int(), dim=1).values[:, :-1].bool()
    return float((right_before & ~correct[:, 1:]).any(1).double().mean())


def tail(arms: list[int], frac: float = TAIL) -> list[int]:
    """The last ``frac`` of the stream (at least one step)."""
    return arms[-max(1, round(len(arms) * frac)):]


def tail_arm(arms: list[int], frac: float = TAIL) -> int:
    """The arm played most often in the last ``frac`` of the stream (ties: shallowest)."""
    counts = Counter(tail(arms, frac))
    return min(counts, key=lambda a: (-counts[a], a))


def per_sample_regret(arms: list[int], objective: list[float]) -> float:
    """The reference's cumulative regret / N: mean over the stream of objective[arm_t] minus
    the best fixed exit's objective."""
    best = min(objective)
    return sum(objective[a] - best for a in arms) / len(arms)


def pick_best(rows: list[dict[str, Any]], final_accuracy: float,
              within: float = BEST_WITHIN) -> dict[str, Any]:
    """The cheapest (lowest FLOPs ratio) row within ``within`` points of the final exit's
    accuracy; if none is, the most accurate row."""
    ok = [r for r in rows if 100 * (r["accuracy_mean"] - final_accuracy) >= -within]
    if ok:
        return min(ok, key=lambda r: (r["flops_ratio_mean"], -r["accuracy_mean"]))
    return max(rows, key=lambda r: r["accuracy_mean"])


def claim_verdict(rows: list[dict[str, Any]], tol: float = CLAIM_TOLERANCE) -> dict[str, Any]:
    """Held iff at every mu the seeds' mean per-sample regret is at most ``tol``."""
    per_mu = {str(r["mu"]): round(r["regret_mean"], 5) for r in rows}
    tails = {str(r["mu"]): round(r["tail_regret_mean"], 5) for r in rows}
    held = all(r["regret_mean"] <= tol for r in rows)
    worst = max(rows, key=lambda r: r["regret_mean"])
    return {"held": held, "rule": (
        f"held iff at every mu the per-sample regret (mean over the stream of error + cost of "
        f"the played exit, minus that of the best fixed exit in hindsight; errors measured "
        f"with the MR labels, as the reference's regret), averaged over the seeds, is <= "
        f"{tol}"), "regret_per_mu": per_mu, "last_20pct_regret_per_mu": tails,
        "worst": {"mu": worst["mu"], "regret": worst["regret_mean"]}}


# -- steps --------------------------------------------------------------------------------------
def load_cache(args: argparse.Namespace, model: Any, batches: list[dict], rows: int
               ) -> ExitLogitsCache:
    """Every exit's logits on MR, from the work dir when it was made by the same model."""
    path = Path(args.work) / "cache-mr.safetensors"
    meta = {"model_dir": str(Path(args.model_dir).resolve()), "rows": rows,
            "data": str(Path(args.data).resolve())}
    if path.is_file():
        cache = ExitLogitsCache.load(path)
        if cache.meta == meta:
            return cache
    print(f"[cache] all-exit logits on {rows} MR sentences", flush=True)
    cache = collect_exit_logits(model, batches, progress=False, meta=meta)
    cache.save(path)
    return cache


def sweep(cache: ExitLogitsCache, temps: torch.Tensor, mus: list[float], seeds: list[int],
          alpha: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Replay the stream per mu and seed; per mu, UCB's numbers beside every fixed exit's."""
    preds = cache.logits.argmax(-1)  # (N, E); temperatures > 0 do not move an argmax
    labels = cache.labels
    full = float(cache.full_cost.sum())
    base = fixed_exit_scores(preds, labels, [0.0] * cache.num_exits)
    exits = {"exit_layer": list(cache.exit_layers), "accuracy": base["accuracy"],
             "disagreement": base["disagreement"],
             "flops_ratio": [float(cache.costs[:, k].sum()) / full
                             for k in range(cache.num_exits)]}
    exits["dominance_violations"] = dominance_violations(preds == labels[:, None])
    rows = []
    for mu in mus:
        costs = depth_costs(cache.exit_layers, scale=mu)
        fixed = fixed_exit_scores(preds, labels, costs)
        runs = []
        for seed in seeds:
            res = replay_stream(cache, UCBExitSelector(costs, alpha), 1,
                                stream_order(cache.num_examples, seed), temps)
            arms = res.arms
            runs.append({"seed": seed, "accuracy": res.accuracy,
                         "mean_layers": float(res.exit_layer.double().mean()),
                         "flops_ratio": float(res.flops.sum()) / full,
                         "mean_reward": res.metrics()["mean_reward"],
                         "tail_arm": tail_arm(arms),
                         "regret": per_sample_regret(arms, fixed["objective"]),
                         "tail_regret": per_sample_regret(tail(arms), fixed["objective"]),
                         # the bandit's own regret, on the label-free reward it maximises
                         "reward_regret": per_sample_regret(arms, [-r for r in fixed["reward"]]),
                         "arm_counts": torch.bincount(torch.tensor(arms),
                                                      minlength=cache.num_exits).tolist()})
        row: dict[str, Any] = {"mu": mu, "costs": costs, "seeds": runs}
        for key in ("accuracy", "mean_layers", "flops_ratio", "regret", "tail_regret",
                    "reward_regret", "mean_reward"):
            values = [r[key] for r in runs]
            row[f"{key}_mean"], row[f"{key}_median"] = (statistics.fmean(values),
                                                        statistics.median(values))
        row["tail_arms"] = [r["tail_arm"] for r in runs]
        row["fixed"] = {k: fixed[k] for k in ("reward", "objective")}
        row["best_fixed_by_objective"] = min(range(len(costs)), key=fixed["objective"].__getitem__)
        row["best_fixed_by_reward"] = max(range(len(costs)), key=fixed["reward"].__getitem__)
        b = row["best_fixed_by_objective"]
        row["best_fixed_accuracy"] = fixed["accuracy"][b]
        row["best_fixed_flops_ratio"] = exits["flops_ratio"][b]
        rows.append(row)
        print(f"[replay] mu {mu}: accuracy {row['accuracy_mean']:.4f}, layers "
              f"{row['mean_layers_mean']:.2f}, tail arms {row['tail_arms']}, best fixed "
              f"{b} (reward: {row['best_fixed_by_reward']})", flush=True)
    return rows, exits


def live_check(args: argparse.Namespace, model: Any, tok: Any, examples: TextExamples,
               length: int, cache: ExitLogitsCache, mu: float) -> dict[str, Any]:
    """The real executor on the first rows of the seed-0 stream == the replay of those rows."""
    order = stream_order(cache.num_examples, 0)[: args.live_rows]
    done = Path(args.work) / f"live-mu{mu}-rows{len(order)}.json"
    if done.is_file():
        return json.loads(done.read_text())
    costs = depth_costs(cache.exit_layers, scale=mu)
    print(f"[live] run_stream on {len(order)} rows, mu {mu}", flush=True)
    batches = te.tokenized_batches(examples.subset(order), tok, 1, length)
    live = run_stream(model, batches, UCBExitSelector(costs, args.alpha))
    off = replay_stream(cache, UCBExitSelector(costs, args.alpha), 1, order,
                        model.temperatures.clone())
    same_arms = live.arms == off.arms
    same_preds = bool(torch.equal(live.predictions, off.predictions))
    diff = [i for i, (a, b) in enumerate(zip(live.arms, off.arms)) if a != b]
    report = {"mu": mu, "rows": len(order), "runtime_equals_replay": same_arms and same_preds,
              "same_arms": same_arms, "same_predictions": same_preds,
              "same_selector_state": live.selector_state == off.selector_state,
              "first_differing_step": diff[0] if diff else None,
              "live_arm_counts": torch.bincount(torch.tensor(live.arms),
                                                minlength=cache.num_exits).tolist(),
              "live_accuracy": live.accuracy}
    done.write_text(json.dumps(report, indent=2))
    return report


class LastExit(UCBExitSelector):
    """Always the deepest exit (the executor's own full-depth path, for the timing)."""

    def select(self) -> int:
        return self.num_arms - 1


def time_stream(args: argparse.Namespace, model: Any, tok: Any, examples: TextExamples,
                length: int, cache: ExitLogitsCache, mu: float) -> dict[str, Any]:
    """Wall-clock of ``run_stream`` at batch 1 in its steady state vs the plain model."""
    order = stream_order(cache.num_examples, 0)
    n = max(1, min(args.timing_rows, len(order) - 1))
    head, timed = order[:-n], order[-n:]
    done = Path(args.work) / f"timing-mu{mu}-rows{n}-t{args.threads}-r{args.repeats}.json"
    if done.is_file():
        return json.loads(done.read_text())
    costs = depth_costs(cache.exit_layers, scale=mu)
    temps = model.temperatures.clone()
    warm = UCBExitSelector(costs, args.alpha)
    replay_stream(cache, warm, 1, head, temps)
    state = warm.state_dict()
    # the timed rows' FLOPs ratio, from the replay of exactly what the timed runs play
    window = replay_stream(cache, UCBExitSelector.from_state_dict(state), 1, timed, temps)
    flops_ratio = float(window.flops.sum()) / float(cache.full_cost[timed].sum())
    batches = [{k: v for k, v in b.items() if k != "labels"}
               for b in te.tokenized_batches(examples.subset(timed), tok, 1, length)]

    def full() -> None:
        with torch.inference_mode():
            for b in batches:
                model.full_depth(**b)

    played: list[list[int]] = []

    def ucb() -> None:
        played.append(run_stream(model, batches, UCBExitSelector.from_state_dict(state)).arms)

    fns = {"full_depth": full, "uee_ucb": ucb,
           "stream_last_exit": lambda: run_stream(model, batches, LastExit(costs, args.alpha))}
    print(f"[time] {n} rows at batch 1, {args.repeats} repeats", flush=True)
    samples = time_interleaved(fns, repeats=args.repeats, warmup=1)
    med = {k: statistics.median(v) for k, v in samples.items()}
    report = {"mu": mu, "rows": n, "threads": args.threads, "repeats": args.repeats,
              "median_s": med, "samples_s": samples,
              "speedup": med["full_depth"] / med["uee_ucb"],
              "speedup_vs_stream_last_exit": med["stream_last_exit"] / med["uee_ucb"],
              "flops_ratio": flops_ratio, "flops_speedup": 1.0 / flops_ratio,
              "mean_layers": float(window.exit_layer.double().mean()),
              # every timed run played the arms the replay of these rows plays
              "timed_equals_replay": all(arms == window.arms for arms in played)}
    done.write_text(json.dumps(report, indent=2))
    return report


# -- report -------------------------------------------------------------------------------------
def build_summary(rows: list[dict[str, Any]], exits: dict[str, Any],
                  timing: dict[str, Any] | None) -> dict[str, Any]:
    final = exits["accuracy"][-1]
    best = pick_best(rows, final)
    return {"final_exit_accuracy": final,
            "best_mu": best["mu"], "accuracy": best["accuracy_mean"],
            "accuracy_drop_points": 100 * (final - best["accuracy_mean"]),
            "mean_layers": best["mean_layers_mean"], "flops_ratio": best["flops_ratio_mean"],
            "measured_speedup": None if timing is None else timing["speedup"],
            "timing_flops_speedup": None if timing is None else timing["flops_speedup"],
            "best_rule": (f"the lowest FLOPs ratio among the mu rows within {BEST_WITHIN} "
                          "point(s) of the final exit's MR accuracy (seed means), else the "
                          "most accurate row"),
            "claim": "UEE-UCB, without labels, reaches the accuracy/cost of the best fixed "
                     "exit in hindsight on the shifted domain",
            "claim_check": claim_verdict(rows)}


def fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    s, ex, live, tm = report["summary"], report["exits"], report["live"], report["timing"]
    lines = [
        "# UEE-UCB on a shifted stream (SST-2 model, Movie Review sentences)", "",
        "Generated by `benchmarks/nlp_stream.py` from `benchmarks/results/nlp_stream.json`.",
        "", "Setup:", ""] + [f"- {k}: {v}" for k, v in report["setup"].items()] + [
        "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}", "",
        "## Fixed exits on MR (every sentence at one exit)", "",
        (f"Strong dominance (an exit right implies every deeper exit right) fails on "
        f"{100 * ex['dominance_violations']:.1f}% of the sentences; there the label-free "
        "reward can rank the exits differently from the true objective."), "",
        ("| exit (arm) | layer | accuracy | P(disagree with exit 0) | accuracy gain over exit 0 "
        "| FLOPs ratio |"), "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, layer in enumerate(ex["exit_layer"]):
        lines.append(f"| {k} | {layer} | {ex['accuracy'][k]:.4f} | "
                     f"{ex['disagreement'][k]:.4f} | "
                     f"{ex['accuracy'][k] - ex['accuracy'][0]:+.4f} | "
                     f"{ex['flops_ratio'][k]:.3f} |")
    lines += [
        "", "## UEE-UCB per cost weight mu (seed means; median accuracy in brackets)", "",
        (f"Exit at depth d costs `mu * d / {max(ex['exit_layer'])}` error-rate units (mu = 1 is "
         "the reference's CS-1); exits are numbered from 0 (exit 0 is the paper's exit 1). "
        "`tail arms`: the exit played most in the last 20% of each seed's stream; `best "
        "fixed`: the exit minimising error + cost in hindsight (labels), and the one "
        "maximising UCB's label-free reward; `regret`: per-sample regret against the "
        "former, as the reference computes it, over the whole stream and over its last 20%; "
        "`reward regret`: the same against the reward's optimum, on the reward."), "",
        ("| mu | accuracy | layers | FLOPs ratio | tail arms | best fixed (obj / reward) | "
        "best fixed accuracy | regret | last-20% regret | reward regret |"),
        "| ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["mus"]:
        lines.append(
            f"| {r['mu']:g} | {r['accuracy_mean']:.4f} ({r['accuracy_median']:.4f}) | "
            f"{r['mean_layers_mean']:.2f} | {r['flops_ratio_mean']:.3f} | {r['tail_arms']} | "
            f"{r['best_fixed_by_objective']} / {r['best_fixed_by_reward']} | "
            f"{r['best_fixed_accuracy']:.4f} | {r['regret_mean']:.4f} | "
            f"{r['tail_regret_mean']:.4f} | {r['reward_regret_mean']:.4f} |")
    c = s["claim_check"]
    lines += [
        "", f"Final exit (full depth) accuracy on MR: {s['final_exit_accuracy']:.4f}.", "",
        "## Summary", "",
        (f"Best row ({s['best_rule']}): mu = {s['best_mu']:g}, accuracy {s['accuracy']:.4f} "
        f"({s['accuracy_drop_points']:.2f} points below full depth), {s['mean_layers']:.2f} "
        f"layers, FLOPs ratio {s['flops_ratio']:.3f}, measured speed-up "
        f"{fmt(s['measured_speedup'], '.2f')}x."), "",
        (f"Claim: *{s['claim']}*: **{'held' if c['held'] else 'not held'}**. Rule: {c['rule']}. "
        f"Regret per mu: {c['regret_per_mu']}; over the last 20% of the stream: "
        f"{c['last_20pct_regret_per_mu']}."), "",
        (f"Live check (`run_stream`, the real executor, on the first {live['rows']} rows of the "
        f"seed-0 stream, mu = {live['mu']:g}): runtime == replay: "
        f"**{live['runtime_equals_replay']}** (arms {live['same_arms']}, predictions "
        f"{live['same_predictions']})."), ""]
    if tm is None:
        lines.append("Timing: not run (`--skip-timing`).")
    else:
        lines.append(
            f"Timing ({tm['rows']} rows at batch 1, the stream's last rows with the selector "
            f"resumed from the replayed state, {tm['threads']} threads, median of "
            f"{tm['repeats']}, interleaved): {tm['speedup']:.2f}x vs the plain full-depth "
            f"model ({tm['speedup_vs_stream_last_exit']:.2f}x vs `run_stream` always at the "
            f"last exit); FLOPs speed-up on the same rows {tm['flops_speedup']:.2f}x.")
    lines += [
        "", "## Caveats", "",
        "- Labels never reach the selector; they only score the runs and define the regret.",
        ("- UCB maximises the label-free reward, which equals the true objective only under "
        "strong dominance; the gap between `best fixed (obj / reward)` shows where the "
        "shift breaks it."),
        "- mu = 0 prices no cost: UCB then seeks the exit that disagrees most with exit 0.",
        ("- The cache was collected at batch 64 (padded), the live check runs sentences one by "
        "one: float round-off could flip a near-tie argmax (it would show as "
        "runtime == replay false)."),
        "- One MR pass per seed (10,662 decisions); the reference averages 20 shuffles.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "benchmarks/work/nlp_methods/sst2/joint"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mr"))
    ap.add_argument("--work", default=str(ROOT / "benchmarks/work/nlp_stream"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/nlp_stream.json"))
    ap.add_argument("--mus", default=",".join(map(str, MUS)))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--live-mu", type=float, default=None,
                    help="mu of the live check and the timing (default: the summary's)")
    ap.add_argument("--live-rows", type=int, default=300)
    ap.add_argument("--timing-rows", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mus = [float(m) for m in args.mus.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    Path(args.work).mkdir(parents=True, exist_ok=True)

    model, tok = tc.load_trained(args.model_dir)
    examples = read_mr(args.data)
    length = tc.max_length(tc.load_job(args.model_dir), examples)
    batches = te.tokenized_batches(examples, tok, 64, length)
    cache = load_cache(args, model, batches, len(examples))
    temps = model.temperatures.clone()
    rows, exits = sweep(cache, temps, mus, seeds, args.alpha)
    summary = build_summary(rows, exits, None)
    mu = summary["best_mu"] if args.live_mu is None else args.live_mu
    live = live_check(args, model, tok, examples, length, cache, mu)
    timing = None if args.skip_timing else time_stream(args, model, tok, examples, length,
                                                       cache, mu)
    summary = build_summary(rows, exits, timing)
    summary["runtime_equals_replay"] = live["runtime_equals_replay"]
    report = {
        "benchmark": "nlp_stream",
        "command": " ".join(["python", "benchmarks/nlp_stream.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "setup": {
            "model": f"{args.model_dir} (MiniLM-L6, SST-2 `joint` recipe of the arena, an "
                     "exit after each of the 6 layers, its calibrated temperatures)",
            "stream": f"Movie Review ({len(examples)} sentences, {args.data}) in "
                      f"stream_order(N, seed) order for seeds {seeds}, batch 1 (one decision "
                      "per sentence), labels for reporting only",
            "selector": f"UCBExitSelector(depth_costs(exit_layers, scale=mu), alpha="
                        f"{args.alpha}), a fresh selector per run",
            "mus": mus, "cache": "all-exit logits at batch 64 (collect_exit_logits)",
        },
        "exits": exits, "mus": rows, "live": live, "timing": timing, "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    doc = (ROOT / "docs/benchmarks/nlp_stream.md" if out == Path(ap.get_default("out"))
           else out.with_suffix(".md"))
    write_markdown(report, doc)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} and {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

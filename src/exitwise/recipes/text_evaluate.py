"""Evaluate and bench a trained text model (``exitwise evaluate`` / ``exitwise bench``): per-exit
scores, every calibrated policy replayed, and measured wall-clock of the real executor, on rows
the model neither trained nor calibrated on. Training and calibration are in
:mod:`.text_classification`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..analysis import (
    collect_exit_logits,
    curves_for_policies,
    overthinking,
    plot_curves,
    replay,
    save_curves_json,
)
from ..analysis.scores import regression_report, score
from ..data import TextExamples, load_examples, split_location
from ..errors import ConfigError, DataError
from ..machine import machine_info
from ..model import MultiExitModel
from ..policies import get_policy
from ..runtime import full_depth_cost
from ..runtime.timing import measure_speedups
from ..training.evaluate import LIVE_MARGIN
from .sources import default_sst2
from .text_classification import example_loader, load_trained, max_length, policies_for, same_place
from .train_job import TrainJob, load_job


def report_path(model_dir: str | Path, kind: str, data: str | None, split: str) -> Path:
    """Where ``evaluate`` / ``bench`` write by default: ``MODEL_DIR/{kind}-{split}``, named
    after the data too when it is not the training data (another file's dev rows must not
    overwrite the report on the model's own dev split)."""
    name = f"{kind}-{split}"
    if data is not None and not same_place(data, load_job(model_dir).data):
        name = f"{kind}-{Path(str(data).rstrip('/')).stem or 'data'}-{split}"
    return Path(model_dir) / name


def eval_examples(model: MultiExitModel, model_dir: str | Path, data: str | None,
                  split: str | None, limit: int | None) -> tuple[TextExamples, TrainJob, str]:
    """(examples, job, split) to evaluate on. ``split`` None: "dev", or "test" when the model
    was trained on dev."""
    job = load_job(model_dir)
    if split is None:
        split = "test" if job.train_split == "dev" else "dev"
    source, trained_on = default_sst2(data or job.data), default_sst2(job.data)
    where = split_location(source, split)
    if where == split_location(trained_on, job.train_split):
        # the held-out slice of this split calibrated the thresholds and the rest trained the
        # model: a score on it would flatter both (a single file serves every split, and
        # "dev" and "validation" name one file)
        single = Path(str(trained_on)).is_file()  # one file serves every split
        other = ("--data with a file of other rows (split your file into train and test "
                 "files and train on the train file)" if single
                 else "--split test, or --data another file")
        raise DataError(f"this model was trained on split {job.train_split!r} of "
                        f"{trained_on}, the rows of {where}; evaluate on other rows ({other})")
    examples = load_examples(source, split, columns=job.columns,
                             label_names=model.config.label_names, task=job.task)
    if limit is not None and limit < len(examples):
        examples = examples.subset(range(limit))
    return examples, job, split


def run_evaluate(
    model_dir: str | Path,
    data: str | None = None,
    split: str | None = None,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-exit scores, overthinking (classes), every calibrated policy replayed, and curves
    (JSON + PNG) on the evaluation split, from one pass that caches all exits' logits; the
    report is also written to ``out_dir/report.json``."""
    model, tokenizer = load_trained(model_dir)
    examples, job, split = eval_examples(model, model_dir, data, split, limit)
    cache = collect_exit_logits(
        model, example_loader(examples, tokenizer, 64, max_length(job, examples)), progress=progress
    )
    temps = model.temperatures.clone()
    regression = model.task == "regression"
    metric = "pearson" if regression else "accuracy"
    per_exit = []
    for k in range(cache.num_exits):
        res = replay(get_policy("static", exit=k), cache)
        per_exit.append(res.score)
    report: dict[str, Any] = {
        "split": split, "rows": len(examples), "source": examples.source,
        "columns": examples.columns, "task": model.task, "metric": metric,
        "exit_layers": model.exit_layers, "labels": model.config.label_names,
        "per_exit_accuracy": [float(a) for a in per_exit], "policies": {},
    }
    if regression:
        last = cache.logits[:, -1, 0]
        report["full"] = regression_report(last, cache.labels)
        report["constant_baseline"] = 0.0
    else:
        counts = torch.bincount(cache.labels, minlength=cache.num_classes)
        report["constant_baseline"] = float(counts.max()) / len(examples)
        report["overthinking"] = overthinking(cache)
    report["dead_exits"] = [
        d for d, a in zip(model.exit_layers, per_exit)
        if not a > report["constant_baseline"] + LIVE_MARGIN
    ]
    report["full_accuracy"] = report["per_exit_accuracy"][-1]
    for key, entry in model.calibration.get("policies", {}).items():
        res = replay(model.calibrated_policy(key), cache, temps)
        report["policies"][key] = {
            "policy": entry["policy"],
            "accuracy": float(res.score),
            "delta_points": 100.0 * (float(res.score) - report["full_accuracy"]),
            "mean_layers": float(res.mean_layers),
            "flops_speedup": float(res.flops_speedup),
            "certified_bound_points": entry.get("heldout", {}).get("certified_bound_points"),
        }
    out = Path(out_dir) if out_dir else report_path(model_dir, "eval", data, split)
    out.mkdir(parents=True, exist_ok=True)
    names = policies_for(model, None)
    curves = curves_for_policies(names, cache, temps)
    save_curves_json(curves, out / "curves.json")
    plot_curves(curves, out / "curves.png", full_accuracy=report["full_accuracy"], metric=metric)
    report["files"] = [str(out / "curves.json"), str(out / "curves.png"), str(out / "report.json")]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def tokenized_batches(examples: TextExamples, tokenizer: Any, batch_size: int,
                      max_length: int) -> list[dict]:
    """Padded batches in file order (each padded to its own longest row), labels included."""
    loader = example_loader(examples, tokenizer, batch_size, max_length)
    return [dict(b) for b in loader]


def runtime_accuracy(model: MultiExitModel, policy: Any, batches: list[dict]) -> dict[str, float]:
    """Accuracy (Pearson's r for regression), mean exit depth and FLOPs speed-up of the
    *real* executor on ``batches``."""
    preds, gold = [], []
    layers = flops = full = 0.0
    for b in batches:
        labels = b["labels"]
        inputs = {k: v for k, v in b.items() if k != "labels"}
        res = model.early_exit(policy, **inputs)
        preds.append(res.predictions)
        gold.append(labels)
        layers += float(res.exit_layer.sum())
        flops += float(res.flops.sum())
        state = model.backbone.start(**inputs)
        full += float(full_depth_cost(model, state).sum())
    p, y = torch.cat(preds), torch.cat(gold)
    return {
        "accuracy": score(p, y, model.task),
        "mean_layers": layers / len(y),
        "flops_speedup": full / flops,
    }


def run_bench(
    model_dir: str | Path,
    data: str | None = None,
    split: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 5,
    limit: int | None = None,
    policies: list[str] | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measured wall-clock of every calibrated policy vs the plain full-depth model
    (``threads``: torch's thread count for the run, restored afterwards)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _bench(model_dir, data, split, batch_sizes, repeats, limit, policies, progress)
    finally:
        torch.set_num_threads(before)


def _bench(model_dir: str | Path, data: str | None, split: str | None,
           batch_sizes: tuple[int, ...], repeats: int, limit: int | None,
           policies: list[str] | None, progress: bool) -> dict[str, Any]:
    model, tokenizer = load_trained(model_dir)
    examples, job, split = eval_examples(model, model_dir, data, split, limit)
    names = policies or list(model.calibration.get("policies", {}))
    if not names:
        raise ConfigError(f"{model_dir} has no calibrated policy: run exitwise calibrate first")
    chosen = {n: model.calibrated_policy(n) for n in names}
    length = max_length(job, examples)
    report: dict[str, Any] = {
        "split": split, "rows": len(examples), "task": model.task,
        "metric": "pearson" if model.task == "regression" else "accuracy",
        "threads": torch.get_num_threads(), "repeats": repeats, "machine": machine_info(),
        "batch_sizes": {},
    }
    full_batches = tokenized_batches(examples, tokenizer, 64, length)
    report["full_accuracy"] = runtime_accuracy(
        model, get_policy("static", exit=model.num_exits - 1), full_batches)["accuracy"]
    for bs in batch_sizes:
        batches = tokenized_batches(examples, tokenizer, bs, length)
        timing = measure_speedups(
            model, [{k: v for k, v in b.items() if k != "labels"} for b in batches], chosen,
            repeats=repeats, progress=f"timing at batch size {bs}" if progress else None,
        )
        entry: dict[str, Any] = {"baseline_s": timing["baseline"]["median_s"], "policies": {}}
        for name, policy in chosen.items():
            got = runtime_accuracy(model, policy, batches)
            entry["policies"][name] = {
                **got,
                "delta_points": 100.0 * (got["accuracy"] - report["full_accuracy"]),
                "median_s": timing[name]["median_s"],
                "speedup": timing[name]["speedup"],
            }
        report["batch_sizes"][str(bs)] = entry
    return report

"""The encoder-classifier story end to end: fine-tune with exits, calibrate, evaluate, time.

Each step reads and writes a model directory (``save_pretrained`` format), so the CLI can run
them one at a time (``exitwise train/calibrate/evaluate/bench``) and a run that is interrupted
resumes where it stopped. Calibration only ever sees a held-out slice of the *training* file;
evaluation reports on the evaluation split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ExitConfig
from ..data import TokenizedDataset, load_examples, make_collator, train_holdout_split
from ..errors import ConfigError
from ..model import MultiExitModel, attach_exits
from ..policies import get_policy
from .sources import default_sst2, resolve_model

JOB_FILE = "exitwise_job.json"
DEFAULT_POLICIES = ("entropy", "confidence", "patience", "patience_confidence")


@dataclass
class TrainJob:
    """Everything ``exitwise train`` needs; saved beside the model as ``exitwise_job.json``."""

    out_dir: str
    model: str = "minilm"
    data: str | None = None
    layers: Any = "all"
    head: str = "pooler"
    strategy: str = "joint"
    weights: str = "uniform"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_train: int | None = None
    holdout: int = 2000
    seed: int = 0
    max_length: int = 64
    num_labels: int | None = None
    truncate: int | None = None  # keep only the first k blocks (static truncation baseline)
    group_by_length: bool = True  # batches of similar length: far less padding on short text
    extra_args: dict[str, Any] = field(default_factory=dict)


def load_tokenizer(model_dir_or_name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir_or_name)


def split_train(job: TrainJob):
    """(train, holdout) examples: the held-out slice of the training file is reserved for
    calibration and never trained on."""
    examples = load_examples(default_sst2(job.data), "train")
    train, holdout = train_holdout_split(examples, job.holdout, seed=job.seed)
    if job.max_train is not None and job.max_train < len(train):
        train = train.subset(range(job.max_train))
    return train, holdout, examples.num_labels


def run_train(job: TrainJob, resume: bool = True, progress: bool = True) -> MultiExitModel:
    """Fine-tune a multi-exit classifier and save it (with its tokenizer) to ``job.out_dir``."""
    from transformers import AutoModel

    from ..training import train

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_model(job.model)
    tokenizer = load_tokenizer(path)
    train_ex, held_ex, n_labels = split_train(job)
    num_labels = job.num_labels or n_labels
    backbone = AutoModel.from_pretrained(path)
    if job.truncate is not None:
        from ..backbones.hf_encoder import truncate_encoder

        truncate_encoder(backbone, job.truncate)
    model = attach_exits(
        backbone, ExitConfig(layers=job.layers, head=job.head, num_labels=num_labels)
    )
    (out / JOB_FILE).write_text(json.dumps(asdict(job), indent=2))
    train_ds = TokenizedDataset(train_ex, tokenizer, max_length=job.max_length)
    # The per-exit accuracy table printed at the end is measured on the held-out slice (no
    # decision is tuned on it here; calibration uses it later).
    held_ds = TokenizedDataset(held_ex, tokenizer, max_length=job.max_length)
    strategy_options = {"weights": job.weights} if job.strategy == "joint" else {}
    args = dict(
        num_train_epochs=job.epochs,
        max_steps=job.max_steps,
        per_device_train_batch_size=job.batch_size,
        learning_rate=job.learning_rate,
        seed=job.seed,
        disable_tqdm=not progress,
        train_sampling_strategy="group_by_length" if job.group_by_length else "random",
        dataloader_pin_memory=torch.cuda.is_available(),
        **job.extra_args,
    )
    train(
        model,
        train_ds,
        held_ds,
        strategy=job.strategy,
        strategy_options=strategy_options,
        output_dir=str(out / "checkpoints"),
        data_collator=make_collator(tokenizer),
        resume=resume,
        save_final=False,
        save_steps=200,
        save_total_limit=1,
        **args,
    )
    model.eval()
    model.save_pretrained(out, save_backbone=True)
    tokenizer.save_pretrained(out)
    return model


def load_job(model_dir: str | Path) -> TrainJob:
    data = json.loads((Path(model_dir) / JOB_FILE).read_text())
    return TrainJob(**data)


def load_trained(model_dir: str | Path) -> tuple[MultiExitModel, Any]:
    model = MultiExitModel.from_pretrained(model_dir).eval()
    return model, load_tokenizer(str(model_dir))


def _loader(examples, tokenizer, batch_size: int, max_length: int):
    ds = TokenizedDataset(examples, tokenizer, max_length=max_length)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=make_collator(tokenizer)
    )


def run_calibrate(
    model_dir: str | Path,
    policies: tuple[str, ...] = DEFAULT_POLICIES,
    max_drop_points: float | None = 1.0,
    budget: float | None = None,
    data: str | None = None,
    holdout: int | None = None,
    temperature: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit temperatures and per-policy thresholds on the held-out slice of train; save them."""
    from ..analysis import collect_exit_logits
    from ..calibration import (
        apply_temperatures,
        fit_temperatures,
        search_accuracy_drop,
        search_budget,
        store_calibration,
    )

    if (max_drop_points is None) == (budget is None):
        raise ConfigError("give exactly one target: max_drop_points or budget")
    job = load_job(model_dir)
    if data is not None:
        job.data = data
    if holdout is not None:
        job.holdout = holdout
    model, tokenizer = load_trained(model_dir)
    _, held, _ = split_train(job)
    cache = collect_exit_logits(
        model, _loader(held, tokenizer, 64, job.max_length), progress=progress
    )
    temps = fit_temperatures(cache) if temperature else torch.ones(model.num_exits)
    apply_temperatures(model, temps)
    report: dict[str, Any] = {"heldout_rows": len(held), "temperatures": temps.tolist()}
    for name in policies:
        policy = get_policy(name)
        if max_drop_points is not None:
            result = search_accuracy_drop(policy, cache, temps, max_drop_points=max_drop_points)
            key = f"{name}@drop{max_drop_points:g}"
        else:
            result = search_budget(policy, cache, temps, budget=budget)
            key = f"{name}@budget{budget:g}"
        store_calibration(model, key, result)
        report[key] = model.calibration["policies"][key]
    model.save_pretrained(model_dir)
    return report


def eval_examples(model_dir: str | Path, data: str | None, split: str, limit: int | None):
    job = load_job(model_dir)
    examples = load_examples(default_sst2(data or job.data), split)
    if limit is not None and limit < len(examples):
        examples = examples.subset(range(limit))
    return examples, job


def run_evaluate(
    model_dir: str | Path,
    data: str | None = None,
    split: str = "dev",
    out_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-exit accuracy, overthinking, every calibrated policy replayed, and curves (JSON+PNG)
    on the evaluation split, from one pass that caches all exits' logits."""
    from ..analysis import (
        collect_exit_logits,
        curves_for_policies,
        overthinking,
        per_exit_accuracy,
        plot_curves,
        replay,
        save_curves_json,
    )

    model, tokenizer = load_trained(model_dir)
    examples, job = eval_examples(model_dir, data, split, limit)
    cache = collect_exit_logits(
        model, _loader(examples, tokenizer, 64, job.max_length), progress=progress
    )
    temps = model.temperatures.clone()
    report: dict[str, Any] = {
        "split": split,
        "rows": len(examples),
        "exit_layers": model.exit_layers,
        "per_exit_accuracy": [float(a) for a in per_exit_accuracy(cache)],
        "overthinking": overthinking(cache),
        "policies": {},
    }
    report["full_accuracy"] = report["per_exit_accuracy"][-1]
    for key, entry in model.calibration.get("policies", {}).items():
        res = replay(model.calibrated_policy(key), cache, temps)
        report["policies"][key] = {
            "policy": entry["policy"],
            "accuracy": float(res.accuracy),
            "mean_layers": float(res.mean_layers),
            "flops_speedup": float(res.flops_speedup),
        }
    out = Path(out_dir) if out_dir else Path(model_dir) / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    curves = curves_for_policies(list(DEFAULT_POLICIES), cache, temps)
    save_curves_json(curves, out / "curves.json")
    plot_curves(curves, out / "curves.png", full_accuracy=report["full_accuracy"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    report["files"] = [str(out / "curves.json"), str(out / "curves.png"), str(out / "report.json")]
    return report


def tokenized_batches(examples, tokenizer, batch_size: int, max_length: int) -> list[dict]:
    """Padded batches in file order (each padded to its own longest row), labels included."""
    loader = _loader(examples, tokenizer, batch_size, max_length)
    return [dict(b) for b in loader]


def runtime_accuracy(model: MultiExitModel, policy, batches: list[dict]) -> dict[str, float]:
    """Accuracy, mean exit depth and FLOPs speed-up of the *real* executor on ``batches``."""
    from ..runtime import full_depth_cost

    correct = total = 0
    layers = flops = full = 0.0
    for b in batches:
        labels = b["labels"]
        inputs = {k: v for k, v in b.items() if k != "labels"}
        res = model.early_exit(policy, **inputs)
        correct += int((res.predictions == labels).sum())
        total += labels.numel()
        layers += float(res.exit_layer.sum())
        flops += float(res.flops.sum())
        state = model.backbone.start(**inputs)
        full += float(full_depth_cost(model, state).sum())
    return {
        "accuracy": correct / total,
        "mean_layers": layers / total,
        "flops_speedup": full / flops,
    }


def run_bench(
    model_dir: str | Path,
    data: str | None = None,
    split: str = "dev",
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 5,
    limit: int | None = None,
    policies: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measured wall-clock of every calibrated policy vs the plain full-depth model."""
    from ..runtime.timing import measure_speedups

    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer = load_trained(model_dir)
    examples, job = eval_examples(model_dir, data, split, limit)
    names = policies or list(model.calibration.get("policies", {}))
    chosen = {n: model.calibrated_policy(n) for n in names}
    report: dict[str, Any] = {
        "split": split,
        "rows": len(examples),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "batch_sizes": {},
    }
    for bs in batch_sizes:
        batches = tokenized_batches(examples, tokenizer, bs, job.max_length)
        timing = measure_speedups(
            model,
            [{k: v for k, v in b.items() if k != "labels"} for b in batches],
            chosen,
            repeats=repeats,
        )
        entry: dict[str, Any] = {"baseline_s": timing["baseline"]["median_s"], "policies": {}}
        for name, policy in chosen.items():
            entry["policies"][name] = {
                **runtime_accuracy(model, policy, batches),
                "median_s": timing[name]["median_s"],
                "speedup": timing[name]["speedup"],
            }
        report["batch_sizes"][str(bs)] = entry
    return report

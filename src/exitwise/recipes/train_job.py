"""The record of an ``exitwise train`` run: its options (``exitwise_job.json`` beside the
model), the defaults that adapt to the user's file, and the check that a rerun into the same
folder is the same job (resuming it with other data or options would keep the old run)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

JOB_FILE = "exitwise_job.json"


@dataclass
class TrainJob:
    """Everything ``exitwise train`` needs; saved beside the model as ``exitwise_job.json``.

    columns: which columns of the data to read (see :func:`exitwise.data.load_examples`).
    train_split: the split trained on (its held-out slice calibrates); e.g. "dev" for a
        folder that ships only dev and test (SNLI in ../shared/data).
    task: "classification" or "regression" (default: from the labels).
    head: the exit head; None: chosen from the checkpoint (:func:`sources.default_head`).
    max_length: tokens per example; None: 64 for single texts, 128 for pairs.
    holdout: training rows kept for calibration; None: :func:`default_holdout` of the file
        (the resolved count is what gets saved, so calibration finds the same rows).
    epochs: None: :func:`default_epochs` of the training rows.
    strategy_options: the training strategy's own options (``weights`` of ``joint`` has its
        own field).
    """

    out_dir: str
    model: str = "minilm"
    data: str | None = None
    layers: Any = "all"
    head: str | None = None
    final_head: str | None = None  # the final exit's head; given, a checkpoint's own
    # classifier is not kept (past_future needs its own head there, for one)
    strategy: str = "joint"
    weights: str = "uniform"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    epochs: float | None = None
    max_steps: int = -1
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_train: int | None = None
    holdout: int | None = None
    seed: int = 0
    max_length: int | None = None
    num_labels: int | None = None
    truncate: int | None = None  # keep only the first k blocks (static truncation baseline)
    group_by_length: bool = True  # batches of similar length: far less padding on short text
    columns: str | None = None
    task: str | None = None
    train_split: str = "train"
    extra_args: dict[str, Any] = field(default_factory=dict)
    # the held-out rows' digest (TextExamples.digest): calibrate checks that the rows it
    # certifies on are still the ones training never saw
    holdout_digest: str | None = None


def default_holdout(rows: int) -> int:
    """2,000 rows (enough to certify a 1-point drop with room to spare), or a quarter of a
    smaller file, so that a small task keeps most of its rows for training."""
    return min(2000, rows // 4)


MIN_DEFAULT_STEPS = 300


def default_epochs(train_rows: int, batch_size: int) -> int:
    """One epoch, or as many (up to 3) as it takes to reach about 300 optimizer steps: one
    pass over a small file trains too few steps for the exits (measured on STS-B:
    docs/data-and-calibration.md)."""
    steps_per_epoch = max(1, -(-train_rows // batch_size))
    return max(1, min(3, -(-MIN_DEFAULT_STEPS // steps_per_epoch)))


def check_same_job(out: Path, job: TrainJob) -> None:
    """Resuming continues the run ``out`` holds, so it must be the same job: other data or
    options would be recorded for a model trained on the old ones."""
    saved_file = out / JOB_FILE
    if not saved_file.is_file() or not (out / "checkpoints").exists():
        return
    saved = json.loads(saved_file.read_text())
    new = asdict(job)
    for key in ("data", "model"):  # one place, however it was written
        if saved.get(key) and new.get(key) and Path(saved[key]).exists() and (
                Path(saved[key]).resolve() == Path(new[key]).resolve()):
            saved[key] = new[key]
    # out_dir names this folder, however it was spelt (relative, absolute)
    differ = {k: (saved[k], new[k]) for k in new
              if k in saved and saved[k] != new[k] and k != "out_dir"}
    if differ:
        listed = ", ".join("the data's rows changed (its held-out slice differs)"
                           if k == "holdout_digest" else f"{k}: {a!r} -> {b!r}"
                           for k, (a, b) in differ.items())
        raise ConfigError(
            f"{out} holds a training run with other settings ({listed}); resuming would "
            "keep that run. Start over with --no-resume (the Python API: resume=False), or "
            "give another --out")


def load_job(model_dir: str | Path) -> TrainJob:
    path = Path(model_dir) / JOB_FILE
    if not path.is_file():
        what = ("a model saved by save_pretrained" if (Path(model_dir) / "exit_config.json")
                .is_file() else "no exitwise run")
        raise ConfigError(
            f"{model_dir} holds {what}, not a run of `exitwise train` (no {JOB_FILE}): the "
            "calibrate, evaluate and bench commands read text classifiers trained by "
            "`exitwise train`; for other models (images, your own loop) use the Python API "
            "(exitwise.analysis.collect_exit_logits, exitwise.calibration, model.early_exit)")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(TrainJob)}
    return TrainJob(**{k: v for k, v in data.items() if k in known})

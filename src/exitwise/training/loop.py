"""``train``: run a strategy's stages with the Hugging Face Trainer, resumably.

Each stage trains in ``output_dir/stage-k`` with its own :class:`ExitTrainer`. When a stage
ends, its weights go to ``stage-k/model.safetensors`` and its name to the progress marker
(``exitwise_progress.json``). ``train(..., resume=True)`` loads the weights of the last
completed stage, skips the completed stages, and resumes the interrupted stage from its last
Trainer checkpoint (model, optimizer, scheduler, RNG and data position), so it continues
rather than restarts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from ..checkpoint import STAGE_WEIGHTS, load_model_weights, write_progress
from ..data.classes import check_class_names, dataset_class_names
from ..errors import ConfigError, DataError, InputError
from .base import STRATEGIES, Stage, TrainingStrategy, get_strategy
from .collate import as_example, default_collator
from .evaluate import ExitEvaluation, evaluate_exit_scores, format_exit_table
from .run_folder import FINAL_DIR, last_complete_checkpoint, prepare_output_dir, run_settings
from .trainer import ExitTrainer

_ARG_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
_DEFAULT_ARGS: dict[str, Any] = {"report_to": "none"}
_FORCED_ARGS: dict[str, Any] = {"remove_unused_columns": False, "label_names": ["labels"]}


@dataclass
class StageResult:
    """What happened to one stage in this call.

    skipped: it was already complete (resume) and did not run.
    resumed_from: the Trainer checkpoint it continued from, if any.
    global_step: optimizer steps done in the stage (counting steps before a resume).
    """

    name: str
    skipped: bool = False
    resumed_from: str | None = None
    global_step: int = 0
    training_loss: float | None = None
    trainable_parameters: int = 0


@dataclass
class TrainResult:
    """The trained model, per-stage facts and (with an eval set) each exit's accuracy
    (Pearson's r for regression) in ``exit_accuracies``, with the baseline in ``evaluation``."""

    model: Any
    strategy: str
    output_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    exit_accuracies: list[float] | None = None
    saved_to: Path | None = None
    evaluation: ExitEvaluation | None = None
    frozen_final: bool = False  # the network's own classifier, kept frozen as the final exit

    @property
    def exit_layers(self) -> list[int]:
        return list(self.model.exit_layers)

    @property
    def dead_exits(self) -> list[int]:
        """Exits no better than a constant prediction on the eval set (empty without one)."""
        return self.evaluation.dead if self.evaluation else []

    def table(self) -> str:
        if self.exit_accuracies is None:
            return "(no evaluation set was given)"
        depths = self.exit_layers
        heads = [self.model.config.head_for(k, depths)[0] for k in self.dead_exits]
        return format_exit_table(self.evaluation or self.exit_accuracies, depths, heads,
                                 self.frozen_final)


def _training_arguments(
    stage: Stage, output_dir: Path, user_args: dict[str, Any]
) -> TrainingArguments:
    merged = {**_DEFAULT_ARGS, **user_args, **stage.args}
    for key, value in _FORCED_ARGS.items():
        if key in merged and merged[key] != value:
            raise ConfigError(
                f"{key}={merged[key]!r} is not supported: exitwise training needs {key}={value!r}"
            )
    merged.update(_FORCED_ARGS)
    merged["output_dir"] = str(output_dir / stage.name)
    try:
        return TrainingArguments(**merged)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad training arguments: {err}") from None


def _drop_short_last_batch(strategy: TrainingStrategy, stages: list[Stage], dataset: Any,
                           output_dir: str | Path, user_args: dict[str, Any],
                           model: torch.nn.Module) -> None:
    """A strategy that needs ``min_batch_rows`` rows per batch (the meta-learning recipes cut
    each batch in two halves), or a model with a batch norm (IMTA's collaboration layer has a
    ``BatchNorm1d``), which cannot normalise one row in training, would fail on an epoch's
    last batch when the dataset's size leaves fewer; such stages drop that batch
    (``dataloader_drop_last``), unless the user chose the setting. Any batch norm counts: a
    ``BatchNorm2d`` fails the same way on a 1 x 1 map (a ResNet's last stage at 32 x 32), and
    elsewhere one row's statistics are noise; one row an epoch is all the drop costs."""
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
             torch.nn.SyncBatchNorm)
    one_row_fails = any(isinstance(m, norms) for m in model.modules())
    need = max(strategy.min_batch_rows, 2 if one_row_fails else 1)
    if need <= 1 or "dataloader_drop_last" in user_args or not hasattr(dataset, "__len__"):
        return
    for stage in stages:
        if "dataloader_drop_last" in stage.args:
            continue
        batch = _training_arguments(stage, Path(output_dir), user_args).train_batch_size
        if 0 < len(dataset) % batch < need:
            stage.args = {**stage.args, "dataloader_drop_last": True}


def strategy_for(model: Any, strategy: str | TrainingStrategy,
                 options: dict[str, Any] | None = None) -> TrainingStrategy:
    """The training strategy, built with its options and checked against the model's task
    (ConfigError otherwise): what ``train`` runs, and what a caller can check before it
    clears anything."""
    chosen = get_strategy(strategy, **(options or {}))
    task = getattr(model, "task", "classification")
    if task not in chosen.tasks:
        usable = [n for n in STRATEGIES.names() if task in STRATEGIES.get(n).tasks]
        raise ConfigError(
            f"training strategy {chosen.registered_name!r} is for "
            f"{'/'.join(chosen.tasks)} models; this model is a {task} model "
            f"(num_labels={model.num_labels}). Use one of: {', '.join(usable)}"
        )
    chosen.check(model)
    return chosen


def _check_args(user_args: dict[str, Any]) -> None:
    unknown = sorted(set(user_args) - _ARG_FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown training argument(s) {unknown}: train() passes extra keywords to "
            "transformers.TrainingArguments (e.g. learning_rate, num_train_epochs, max_steps, "
            "per_device_train_batch_size, save_steps, bf16, seed)"
        )
    if "output_dir" in user_args:
        raise ConfigError("give output_dir as train()'s own argument")


SCANNED_ITEMS = 1000  # items of a generic dataset decoded to check labels (evenly spaced)


def _label_column(dataset: Any) -> list[Any] | None:
    """The labels of ``dataset`` where they can be read cheaply, or None.

    A ``datasets.Dataset``: its raw column (without the user's transform, which may drop or
    rename it and would decode every image); a torchvision folder or ``Subset`` of one: its
    ``targets``; a list: every item; any other dataset: :data:`SCANNED_ITEMS` evenly spaced
    items (each ``dataset[i]`` may decode and augment an image). Labels outside a scan are
    checked batch by batch during training."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list):  # a datasets.Dataset
        key = "labels" if "labels" in names else "label" if "label" in names else None
        raw = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
        return list(raw[key]) if key else None
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):  # kept as given (ids or values)
        return targets.tolist() if isinstance(targets, torch.Tensor) else list(targets)
    parent = getattr(dataset, "dataset", None)
    indices = getattr(dataset, "indices", None)
    parent_targets = getattr(parent, "targets", None)
    if parent_targets is not None and indices is not None:  # torch.utils.data.Subset
        return [parent_targets[int(i)] for i in indices]
    n = len(dataset)
    if isinstance(dataset, (list, tuple)) or n <= SCANNED_ITEMS:
        picks = range(n)
    else:
        picks = sorted({int(j * (n - 1) / (SCANNED_ITEMS - 1)) for j in range(SCANNED_ITEMS)})
    column = []
    for i in picks:
        item = as_example(dataset[i])
        column.append(item.get("labels", item.get("label")))
    return column


def _check_dataset_labels(dataset: Any, num_labels: int, name: str) -> None:
    """Fail before training starts when a label is out of range (cheap scans only)."""
    if not hasattr(dataset, "__len__"):
        return
    if len(dataset) == 0:
        raise DataError(f"the {name} dataset is empty")
    column = _label_column(dataset)
    if column is None:
        return
    if any(v is None for v in column):
        raise DataError(f"some {name} examples have no 'labels'")
    if num_labels == 1:  # regression targets
        targets = torch.as_tensor([float(v) for v in column])
        if not bool(torch.isfinite(targets).all()):
            raise InputError(f"the {name} dataset has non-finite regression targets")
        return
    if any(isinstance(v, float) and not float(v).is_integer() for v in column):
        raise InputError(
            f"the {name} dataset has fractional labels but the model has {num_labels} classes; "
            "a regression model needs num_labels=1"
        )
    ids = []
    for v in column:
        try:
            ids.append(int(v))
        except (TypeError, ValueError):  # a class name: int() would fail inside the collator
            raise DataError(
                f"the {name} dataset's labels must be class ids 0..{num_labels - 1}; got "
                f"{v!r}: map class names to ids (exitwise.data.load_examples does, and sets "
                "label_names)") from None
    values = torch.as_tensor(ids)
    bad = values[(values < 0) | (values >= num_labels)]
    if bad.numel():
        raise InputError(
            f"the {name} dataset has labels outside [0, {num_labels}) (e.g. {int(bad[0])}); "
            f"the model was built with num_labels={num_labels}"
        )


def _set_trainable(model: torch.nn.Module, stage: Stage) -> int:
    names = stage.trainable_names(model)
    if not names:
        raise ConfigError(f"stage {stage.name!r} trains no parameters")
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        count += p.numel() if name in names else 0
    return count


def train(
    model: Any,
    train_dataset: Any,
    eval_dataset: Any = None,
    strategy: str | TrainingStrategy = "joint",
    output_dir: str | Path | None = None,
    data_collator: Callable | None = None,
    *,
    strategy_options: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[TrainerCallback] | None = None,
    save_final: bool = True,
    eval_batch_size: int = 64,
    **training_args: Any,
) -> TrainResult:
    """Train ``model`` (a MultiExitModel) with a registered training strategy.

    Args:
        strategy: a registered name (``exitwise.training.STRATEGIES.names()``) or an object;
            ``strategy_options`` are passed to the named strategy (``{"weights": "depth"}``).
        output_dir: run folder (stage sub-folders, checkpoints, marker, ``final/`` model).
        data_collator: batches of dicts -> tensors; default pads with the backbone's pad id.
        resume: continue an interrupted run in ``output_dir`` (completed stages are skipped,
            the interrupted one resumes from its last checkpoint).
        overwrite: delete an earlier run's stage folders in ``output_dir`` first.
        callbacks: extra ``transformers.TrainerCallback`` objects for every stage's Trainer.
        save_final: write ``output_dir/final`` with ``model.save_pretrained``.
        **training_args: passed to ``transformers.TrainingArguments`` (learning_rate,
            max_steps, num_train_epochs, per_device_train_batch_size, save_steps, bf16,
            seed, use_cpu, ddp_backend, disable_tqdm ...); report_to defaults to "none".

    Returns a :class:`TrainResult`; with ``eval_dataset`` it holds each exit's accuracy, and
    the table is printed (main process only).
    """
    if output_dir is None:
        raise ConfigError(
            "train() needs an output_dir (checkpoints and the resume marker go there)"
        )
    if not hasattr(model, "exit_layers") or not hasattr(model, "check_labels"):
        raise ConfigError(
            "train() needs a MultiExitModel (see exitwise.attach_exits), "
            f"got {type(model).__name__}"
        )
    _check_args(training_args)
    chosen = strategy_for(model, strategy, strategy_options)
    stages = chosen.stages(model)
    _drop_short_last_batch(chosen, stages, train_dataset, output_dir, training_args, model)
    _check_dataset_labels(train_dataset, model.num_labels, "training")
    # class ids must mean the same classes (an ImageFolder numbers its sub-folders)
    names = model.config.label_names
    check_class_names(train_dataset, names, "training")
    if eval_dataset is not None:
        _check_dataset_labels(eval_dataset, model.num_labels, "evaluation")
        check_class_names(eval_dataset, names or dataset_class_names(train_dataset),
                          "evaluation")
    collator = data_collator or default_collator(model)
    out = Path(output_dir)

    # Every rank reads the folder before the main one writes to it.
    probe = _training_arguments(stages[0], out, training_args)
    settings = run_settings(training_args, train_dataset)
    with probe.main_process_first(desc="check run folder"):
        completed = prepare_output_dir(
            out, chosen, stages, resume, overwrite and probe.should_save, settings
        )
    # The settings go on record before the first checkpoint, once every rank has read the
    # folder (main_process_first releases the others only as the main one moves on).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if probe.should_save:
        out.mkdir(parents=True, exist_ok=True)
        write_progress(out, {"strategy": chosen.describe(), "completed": completed,
                             "settings": settings})
    # the network's own classifier stayed frozen when no stage trains it (exits_only does)
    final = {id(p) for p in model.heads[-1].parameters()}
    frozen_final = getattr(model.heads[-1], "registered_name", "") == "native" and not any(
        id(p) in final for stage in stages for p in stage.trainable(model))
    result = TrainResult(model=model, strategy=chosen.registered_name, output_dir=out,
                         frozen_final=frozen_final)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for i, stage in enumerate(stages):
            if stage.name in completed:
                # Completed stages form a prefix; the last one's weights are where we are.
                if i + 1 == len(stages) or stages[i + 1].name not in completed:
                    load_model_weights(model, out / stage.name / STAGE_WEIGHTS)
                result.stages.append(StageResult(stage.name, skipped=True))
                continue
            result.stages.append(
                _run_stage(
                    model,
                    stage,
                    out,
                    training_args,
                    train_dataset,
                    eval_dataset,
                    collator,
                    callbacks,
                    resume,
                )
            )
            completed.append(stage.name)
            args = _training_arguments(stage, out, training_args)
            if args.should_save:
                write_progress(out, {"strategy": chosen.describe(), "completed": completed,
                                     "settings": settings})
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    if chosen.tunes_backbone:
        model.backbone_tuned = True

    main = _training_arguments(stages[-1], out, training_args)
    if save_final and main.should_save:
        result.saved_to = model.save_pretrained(out / FINAL_DIR)
    if eval_dataset is not None:
        result.evaluation = evaluate_exit_scores(
            model, eval_dataset, collator, eval_batch_size, progress=not main.disable_tqdm
        )
        result.exit_accuracies = result.evaluation.scores
        if main.should_save:
            print(f"per-exit {result.evaluation.metric} after {chosen.registered_name} "
                  "training:")
            print(result.table())
    return result


def _run_stage(
    model: Any,
    stage: Stage,
    out: Path,
    user_args: dict[str, Any],
    train_dataset: Any,
    eval_dataset: Any,
    collator: Callable,
    callbacks: Sequence[TrainerCallback] | None,
    resume: bool,
) -> StageResult:
    args = _training_arguments(stage, out, user_args)
    count = _set_trainable(model, stage)
    stage_dir = Path(args.output_dir)
    checkpoint = last_complete_checkpoint(stage_dir) if resume else None
    trainer = ExitTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=list(callbacks or []),
        stage=stage,
    )
    output = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # stage-k/model.safetensors: what a resume of later stages starts from
    return StageResult(
        name=stage.name,
        resumed_from=checkpoint,
        global_step=int(output.global_step),
        training_loss=float(output.training_loss),
        trainable_parameters=count,
    )

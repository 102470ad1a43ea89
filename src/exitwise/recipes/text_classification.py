"""The encoder story end to end: fine-tune with exits, calibrate (evaluate and time:
:mod:`.text_evaluate`).

Each step reads and writes a model directory (``save_pretrained`` format), so the CLI can run
them one at a time (``exitwise train/calibrate/evaluate/bench``) and a run that is interrupted
resumes where it stopped. Calibration only ever sees a held-out slice of the *training* file;
evaluation reports on the evaluation split. Single sentences and sentence pairs, class ids or
class names, and regression targets (one output, MSE, Pearson's r) all take the same path.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..analysis import collect_exit_logits
from ..backbones.hf_encoder import base_model_of, truncate_encoder
from ..calibration import (
    apply_temperatures,
    calibrate_cats,
    drop_stale_calibrations,
    fit_temperatures,
    search_accuracy_drop,
    search_budget,
    store_calibration,
)
from ..checkpoint import write_json_atomic
from ..config import ExitConfig
from ..data import (
    TextExamples,
    TokenizedDataset,
    load_examples,
    make_collator,
    train_holdout_split,
)
from ..errors import ConfigError, DataError
from ..model import MultiExitModel, attach_exits
from ..model_io import remove_model_files
from ..policies import POLICIES, get_policy
from ..policies.patience import TOLERANCE_PER_SD, tolerance_for_targets
from ..training import STRATEGIES, train
from ..training.loop import strategy_for
from .sources import default_head, default_sst2, resolve_model, task_classifier
from .train_job import (  # the job record; importable from here as before
    JOB_FILE,
    TrainJob,
    check_same_job,
    default_epochs,
    default_holdout,
    load_job,
)

TRAIN_REPORT = "train_report.json"
DEFAULT_POLICIES = ("entropy", "confidence", "patience", "patience_confidence")
DEFAULT_DELTA = 0.1
Print = Callable[..., None]


def load_tokenizer(model_dir_or_name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir_or_name)


def split_train(job: TrainJob, label_names: list[str] | None = None
                ) -> tuple[TextExamples, TextExamples, TextExamples]:
    """(train, holdout, all) examples: the held-out slice of the training file is reserved
    for calibration and never trained on."""
    examples = load_examples(default_sst2(job.data), job.train_split, columns=job.columns,
                             label_names=label_names, task=job.task)
    if job.holdout is None:
        job.holdout = default_holdout(len(examples))
    train, holdout = train_holdout_split(examples, job.holdout, seed=job.seed)
    if job.max_train is not None and job.max_train < len(train):
        train = train.subset(range(job.max_train))
    return train, holdout, examples


def max_length(job: TrainJob, examples: TextExamples) -> int:
    return job.max_length or (128 if examples.is_pair else 64)


def run_train(job: TrainJob, resume: bool = True, progress: bool = True,
              print_fn: Print = print) -> MultiExitModel:
    """Fine-tune a multi-exit model and save it (with its tokenizer) to ``job.out_dir``;
    prints what it read, the head it chose and the per-exit table (dead exits flagged).

    A ``*ForSequenceClassification`` checkpoint keeps its classifier as the final exit when
    the data's labels mean its outputs (:func:`sources.task_classifier`), else its encoder
    gets a fresh final head; the printed note says which."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key in ("data", "model"):  # later commands run from anywhere; one spelling per place
        where = getattr(job, key)
        if where is not None and Path(where).exists():
            setattr(job, key, str(Path(where).resolve()))
    path = resolve_model(job.model)
    tokenizer = load_tokenizer(path)
    train_ex, held_ex, every = split_train(job)
    print_fn(f"data: {every.describe()}")
    if job.epochs is None and job.max_steps <= 0:
        job.epochs = default_epochs(len(train_ex), job.batch_size)
    length = f"{job.max_steps} steps" if job.max_steps > 0 else f"{job.epochs:g} epoch(s)"
    print_fn(f"training on {len(train_ex)} rows for {length}; {len(held_ex)} held out for "
             "calibration")
    for note in every.notes:
        print_fn(f"data: {note}")
    if every.task != "regression" and every.num_labels < 2:
        raise DataError(
            f"the training data has only one class ({every.describe()}): a classifier needs "
            "rows of two classes or more (a numeric target: --task regression)")
    if every.task != "regression" and every.num_labels > max(100, len(every) // 10):
        print_fn(f"data: {every.num_labels} classes for {len(every)} rows; if the labels are "
                 "numbers to predict, --task regression")
    if job.num_labels is not None and job.num_labels != every.num_labels:
        raise ConfigError(
            f"num_labels={job.num_labels} but the data has {every.num_labels} "
            f"{'outputs' if every.task == 'regression' else 'classes'}"
        )
    own = task_classifier(path, every)
    if own is not None and job.final_head is not None:  # a fresh final head was asked for
        own = None
    if own is not None:
        print_fn(f"model: {own.note}")
    num_labels, label_names = every.num_labels, every.label_names
    if own is not None and own.keep:
        if own.label_names and own.label_names != every.label_names:  # its ids, its order
            train_ex, held_ex, every = split_train(job, own.label_names)
        num_labels, label_names = own.num_labels, own.label_names or every.label_names
        backbone = AutoModelForSequenceClassification.from_pretrained(path)
    else:
        backbone = AutoModel.from_pretrained(path)
    head = job.head
    if head is None:
        head, why = default_head(path, base_model_of(backbone))
        print_fn(f"exit head: {head} ({why}; --head to choose another)")
    job.head = head
    if job.truncate is not None:
        truncate_encoder(backbone, job.truncate)
    torch.manual_seed(job.seed)  # the fresh heads' draw: the same command, the same model
    model = attach_exits(backbone, ExitConfig(
        layers=job.layers, head=head, num_labels=num_labels, label_names=label_names,
        final_head=job.final_head,
    ))
    job.max_length = max_length(job, every)
    job.holdout_digest = held_ex.digest()
    strategy_options = {"weights": job.weights} if job.strategy == "joint" else {}
    strategy_options.update(job.strategy_options)
    strategy_for(model, job.strategy, strategy_options)  # refused before anything is cleared
    if resume:
        check_same_job(out, job)
    else:  # starting over: the old model must not stand beside the new job until it is done
        remove_model_files(out, (TRAIN_REPORT,))
    write_json_atomic(out / JOB_FILE, asdict(job))
    train_ds = TokenizedDataset(train_ex, tokenizer, max_length=job.max_length)
    # The per-exit table printed at the end is measured on the held-out slice (no decision
    # is tuned on it here; calibration uses it later).
    held_ds = TokenizedDataset(held_ex, tokenizer, max_length=job.max_length)
    cut = train_ds.truncated + held_ds.truncated
    cut_note = (f"{cut} of {len(train_ds) + len(held_ds)} rows are longer than "
                f"{job.max_length} tokens and were cut there (--max-length to keep more)")
    if cut:
        print_fn(f"data: {cut_note}")
    args = dict(
        num_train_epochs=job.epochs if job.epochs is not None else 1.0,
        max_steps=job.max_steps,
        per_device_train_batch_size=job.batch_size,
        learning_rate=job.learning_rate,
        seed=job.seed,
        disable_tqdm=not progress,
        train_sampling_strategy="group_by_length" if job.group_by_length else "random",
        dataloader_pin_memory=torch.cuda.is_available(),
        **job.extra_args,
    )
    result = train(
        model, train_ds, held_ds, strategy=job.strategy, strategy_options=strategy_options,
        output_dir=str(out / "checkpoints"), data_collator=make_collator(tokenizer),
        resume=resume, overwrite=not resume, save_final=False, save_steps=200,
        save_total_limit=1, **args,
    )
    if cut and result.evaluation is not None and result.evaluation.dead:
        print_fn(f"note: {cut_note}; dead exits may lack what was cut away")
    model.eval()
    tokenizer.save_pretrained(out)  # first: exit_config.json, written last, marks a model
    model.save_pretrained(out, save_backbone=True)
    ev = result.evaluation
    if ev is not None:
        (out / TRAIN_REPORT).write_text(json.dumps({
            "metric": ev.metric, "heldout_rows": len(held_ex), "exit_layers": model.exit_layers,
            "per_exit": ev.scores, "constant_baseline": ev.baseline,
            "dead_exits": [model.exit_layers[k] for k in ev.dead], "head": head,
        }, indent=2))
    return model


def load_trained(model_dir: str | Path) -> tuple[MultiExitModel, Any]:
    """(model, tokenizer) of a run of ``exitwise train``; ConfigError for any other folder."""
    load_job(model_dir)  # a clear refusal of folders no `exitwise train` made
    model = MultiExitModel.from_pretrained(model_dir).eval()
    return model, load_tokenizer(str(model_dir))


def example_loader(examples: TextExamples, tokenizer: Any, batch_size: int, length: int):
    ds = TokenizedDataset(examples, tokenizer, max_length=length)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, collate_fn=make_collator(tokenizer)
    )


def policies_for(model: MultiExitModel, names: tuple[str, ...] | None,
                 strategy: str | None = None) -> list[str]:
    """The policies to calibrate: ``names``, or the defaults that apply to the model's task,
    the policy of its learned exit score and the exit rule its training ``strategy`` is
    paired with (FastBERT's, ELBERT's, Ensemble ICs' voting)."""
    if names:
        for n in names:
            policy = get_policy(n)
            policy.check_task(model.task)
            if policy.fitted_by is not None:
                raise ConfigError(
                    f"policy {n!r} is fitted by its own method ({policy.fitted_by}), which "
                    "calibrate does not run: use it from Python on a cache of held-out exit "
                    "logits, or calibrate another policy")
            if policy.uses_scores and model.scorer is None:
                raise ConfigError(
                    f"policy {n!r} reads a learned exit score, but this model has no exit "
                    "scorer (train it with a strategy that fits one, e.g. berxit)")
        return list(names)
    chosen = [n for n in DEFAULT_POLICIES if model.task in POLICIES.get(n).tasks]
    # a model trained with a learned exit score (BERxiT's lte, CATs, DACT) is calibrated on
    # it too: it is what its recipe trained for
    have = getattr(model.scorer, "registered_name", None) if model.scorer is not None else None
    chosen += [n for n in POLICIES.names() if have is not None and n not in chosen
               and POLICIES.get(n).scorer == have and model.task in POLICIES.get(n).tasks]
    paired = STRATEGIES.get(strategy).exit_policy if strategy in STRATEGIES.names() else None
    if paired is not None and paired not in chosen and model.task in POLICIES.get(paired).tasks:
        chosen.append(paired)
    return chosen


def run_calibrate(
    model_dir: str | Path,
    policies: tuple[str, ...] | None = None,
    max_drop_points: float | None = 1.0,
    budget: float | None = None,
    data: str | None = None,
    holdout: int | None = None,
    temperature: bool = True,
    progress: bool = True,
    delta: float | None = DEFAULT_DELTA,
    risk: str = "drop",
    suffix: str = "",
) -> dict[str, Any]:
    """Fit temperatures and per-policy settings on the held-out slice of train; save them
    (as ``<policy>@drop<X><suffix>`` or ``<policy>@budget<X><suffix>``).

    With a drop target and ``delta`` (default 0.1), each policy gets the most aggressive
    setting whose drop is *certified* within the target with probability >= 1 - delta
    (:mod:`exitwise.calibration.certify`); ``delta=None`` picks by the observed drop only.
    Regression models are calibrated on Pearson's r without a certificate (noted in the
    report). The ``cats`` policy is calibrated by CATs' conformal method instead, for a
    consistency with the full model of at least ``1 - max_drop_points / 100``. Raises
    CalibrationRefused when the held-out slice is too small to certify.
    """
    if (max_drop_points is None) == (budget is None):
        raise ConfigError("give exactly one target: max_drop_points or budget")
    job = load_job(model_dir)
    trained_data = data is None or same_place(data, job.data)
    if data is not None:
        job.data = data
    model, tokenizer = load_trained(model_dir)
    # a policy that cannot apply fails before caching
    names = policies_for(model, policies, job.strategy)
    kept_out = job.holdout  # the slice training never saw
    _, held, every = split_train(job, label_names=model.config.label_names)
    if trained_data and job.holdout_digest not in (None, held.digest()):
        raise ConfigError(
            f"the training data ({job.data}) changed since {model_dir} was trained: its "
            f"held-out slice ({len(held)} rows) is no longer the rows training never saw, so "
            "a certificate on it would not hold. Restore the file, train again "
            "(--no-resume), or calibrate on other data with --data")
    if holdout is not None:
        wanted = (int(round(holdout * len(every))) if isinstance(holdout, float) and holdout < 1
                  else int(holdout))
        if trained_data and kept_out is not None and wanted > kept_out:
            raise ConfigError(
                f"holdout={holdout} asks for {wanted} rows, but training kept only {kept_out} "
                "out: the others were trained on (a smaller hold-out, a part of those, works)")
        job.holdout = holdout  # the slice is the first rows of one seeded order: a part of it
        held = train_holdout_split(every, holdout, seed=job.seed)[1]
    cache = collect_exit_logits(
        model, example_loader(held, tokenizer, 64, max_length(job, held)), progress=progress
    )
    notes = []
    fit = temperature and model.task != "regression"  # a value has no probabilities to scale
    if fit and getattr(model.scorer, "registered_name", None) == "dact":
        # DACT accumulates the exits' raw distributions, as it was trained (policies/dact.py)
        fit = False
        notes.append("dact: temperatures left at 1 (DACT's halting accumulates the exits' "
                     "distributions as trained)")
    temps = fit_temperatures(cache) if fit else torch.ones(model.num_exits)
    previous = model.temperature_list()
    apply_temperatures(model, temps)
    stale = drop_stale_calibrations(model, previous)
    if stale:  # their thresholds were searched, and certified, under the old temperatures
        notes.append(f"removed {', '.join(stale)}: calibrated under other temperatures than "
                     "this run's (calibrate them again to keep them)")
    if model.task == "regression" and delta is not None and budget is None:
        notes.append("regression: thresholds chosen on the observed Pearson drop; no "
                     "certificate (Pearson's r is not a mean of per-row losses)")
        delta = None
    report: dict[str, Any] = {
        "heldout_rows": len(held), "temperatures": temps.tolist(), "task": model.task,
        "delta": delta if budget is None else None, "notes": notes, "policies": {},
    }
    kind = "drop" if risk == "drop" else "disagree"  # one key per risk: none overwritten
    for name in names:
        policy = get_policy(name)
        if name == "patience" and model.task == "regression":  # PABEE's tolerance, in units
            tolerance = tolerance_for_targets(held.labels)      # of these targets' spread
            policy = get_policy(name, tolerance=tolerance)
            notes.append(f"patience: tolerance {tolerance:.4g} ({TOLERANCE_PER_SD} x the "
                         "held-out targets' standard deviation)")
        # what the searches warn about (a target missed) is a note of the report, printed
        # with it, not a Python warning with a source line
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result, key = _calibrate_one(name, policy, cache, temps, max_drop_points, budget,
                                         delta, risk, kind, suffix)
        notes.extend(f"{key}: {w.message}" for w in caught)
        store_calibration(model, key, result)
        report["policies"][key] = model.calibration["policies"][key]
    model.save_calibration(model_dir)  # the fine-tuned backbone stays as it is
    return report


def _calibrate_one(name: str, policy: Any, cache: Any, temps: torch.Tensor,
                   max_drop_points: float | None, budget: float | None, delta: float | None,
                   risk: str, kind: str, suffix: str) -> tuple[Any, str]:
    """One policy's calibration result and the key it is stored under."""
    if max_drop_points is None:
        return (search_budget(policy, cache, temps, budget=budget),
                f"{name}@budget{budget:g}{suffix}")
    if name == "cats":
        # CATs' own calibration: conformal consistency with the full model at 1 - target
        # (an inconsistency rate bounds the accuracy drop)
        result = calibrate_cats(cache, epsilon=max_drop_points / 100.0, delta=delta,
                                temperatures=temps)
    else:
        result = search_accuracy_drop(policy, cache, temps, max_drop_points=max_drop_points,
                                      delta=delta, risk=risk)
    return result, f"{name}@{kind}{max_drop_points:g}{suffix}"


def same_place(a: str | None, b: str | None) -> bool:
    """Whether two data locations name one place (however spelt; the default SST-2 for
    None)."""
    pa, pb = Path(str(default_sst2(a))), Path(str(default_sst2(b)))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(pa) == str(pb)

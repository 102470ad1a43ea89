"""The one training loop of the decoder-LM objectives, with exact resume and no pickle.

Every objective (:mod:`exitwise.lm.objectives`) reduces to a :class:`Task`: the module whose
state is checkpointed, the parameters AdamW updates, a loss for step ``t`` (a pure function
of the step: the batch, the layers dropped and the curriculum all derive from ``(seed, t)``),
and a held-out evaluation. :func:`run_task` does the rest for all of them alike:

- only the task's parameters require grad inside the loop; every parameter's
  ``requires_grad`` and every module's train/eval mode are restored afterwards, also on error;
- the learning rate is a pure function of the step (:func:`lr_scale`: warmup, at most a
  tenth of the steps, then constant, cosine to a floor, or linear to 0), so a resumed run
  follows the same schedule;
- gradients are clipped to ``max_grad_norm`` when it is set;
- ``folder/`` receives ``weights.safetensors`` (the task module, aliases stored once),
  ``optimizer.safetensors`` (the optimizer's tensors and the random state) and ``state.json``
  (step, histories, the evaluation before training, the optimizer's other values and the
  run's settings) every ``save_every`` steps and at the end, committed as one
  (:func:`save_checkpoint`: written in full under pending names, then renamed, the state
  last), so an interruption at any moment leaves one whole checkpoint. A rerun with the same
  settings continues from it and ends with the weights an uninterrupted run would have; other
  settings are refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import (
    load_optimizer_state,
    load_unique_state_dict,
    optimizer_state,
    read_json,
    unique_state_dict,
    write_json_atomic,
)
from ..errors import CheckpointError, ConfigError

SCHEDULES = ("constant", "cosine", "linear")
STATE_NAME, WEIGHTS_NAME, OPTIM_NAME = "state.json", "weights.safetensors", "optimizer.safetensors"

StepLoss = Callable[[int], "tuple[torch.Tensor, dict[str, float | None]]"]


@dataclass
class Task:
    """One objective, ready to train.

    module: what the checkpoint stores and restores (e.g. the tuned exit heads, or the whole
        LM); params: what AdamW updates (the module's trainable parameters); root: the model
        whose ``requires_grad`` flags and train/eval modes are saved and restored.
    step_loss: ``t -> (scalar loss with grad, {part name: float or None})`` for step ``t``.
    evaluate: the held-out measurement, ``{key: float}`` (JSON-able), run before training
        (fresh start only; a resume keeps the first one) and after.
    train_mode: puts the trained modules in train mode; called before every step.
    setup: a fresh start only, before the first evaluation (e.g. choosing draft vocabularies,
        which the checkpoint then carries).
    settings: JSON facts a checkpoint must share to be continued (model, objective, data).
    """

    module: nn.Module
    params: list[nn.Parameter]
    root: nn.Module
    step_loss: StepLoss
    evaluate: Callable[[], dict[str, float]]
    train_mode: Callable[[], None]
    settings: dict[str, Any]
    setup: Callable[[], None] = field(default=lambda: None)


@dataclass
class LoopSettings:
    """The optimizer and schedule every objective shares (AdamW)."""

    steps: int
    lr: float
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    save_every: int = 100


@dataclass
class LoopState:
    """What a run did: ``step`` optimizer steps in all (``start_step`` of them before this
    call), one loss per step, each part's value per step, the evaluations."""

    step: int
    start_step: int
    loss_history: list[float]
    part_history: dict[str, list[float | None]]
    before: dict[str, float]
    after: dict[str, float]


def lr_scale(schedule: str, step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at 0-based ``step`` of ``steps``.

    A linear warmup over ``warmup`` steps ((t + 1) / warmup), then ``"constant"``: 1;
    ``"cosine"``: ``min_ratio + (1 - min_ratio) (1 + cos(pi d)) / 2`` with d the done share
    of the post-warmup steps; ``"linear"``: ``(steps - t) / (steps - warmup)``, to 0 at the
    end (the Hugging Face Trainer's default).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        done = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))
    return max(0, steps - step) / max(1, steps - warmup)


@contextmanager
def only_training(root: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require grad; every parameter's ``requires_grad``
    and every module's train/eval mode are restored afterwards (also on error)."""
    saved_flags = {id(p): p.requires_grad for p in root.parameters()}
    saved_flags.update({id(p): p.requires_grad for p in params if id(p) not in saved_flags})
    saved_modes = {m: m.training for m in root.modules()}
    for p in root.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        by_id = {id(p): p for p in [*root.parameters(), *params]}
        for pid, flag in saved_flags.items():
            by_id[pid].requires_grad_(flag)
        for m, mode in saved_modes.items():
            m.training = mode


# -- checkpoints ---------------------------------------------------------------------------
PENDING = ".pending"  # a checkpoint's files while they are written, before the commit


def save_checkpoint(folder: Path, task: Task, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Write the three files as one commit: each first in full under a pending name, the state
    last, then each renamed over its old version. An interruption before the pending state
    exists leaves the previous checkpoint whole (the pending files are dropped when it is next
    read); after it, the commit is finished when it is next read (:func:`settle_checkpoint`).
    Writing the files in place, state last, could leave weights of one step beside the state
    of an earlier one, and a resume would silently mix them."""
    folder.mkdir(parents=True, exist_ok=True)
    settle_checkpoint(folder)
    save_file(unique_state_dict(task.module), str(folder / (WEIGHTS_NAME + PENDING)),
              metadata={"format": "pt"})
    device = next(iter(task.params)).device if task.params else None
    tensors, rest = optimizer_state(optimizer, device)
    save_file(tensors, str(folder / (OPTIM_NAME + PENDING)), metadata={"format": "pt"})
    write_json_atomic(folder / (STATE_NAME + PENDING), dict(state, optimizer=rest), indent=1)
    settle_checkpoint(folder)


def settle_checkpoint(folder: Path) -> None:
    """Finish or drop a commit an interruption cut short (see :func:`save_checkpoint`): with
    the pending state written, every pending file is complete and replaces its old version
    (the state last); without it, the pending files are incomplete and are removed."""
    if (folder / (STATE_NAME + PENDING)).is_file():
        for name in (WEIGHTS_NAME, OPTIM_NAME, STATE_NAME):
            if (folder / (name + PENDING)).is_file():
                os.replace(folder / (name + PENDING), folder / name)
    else:
        for name in (WEIGHTS_NAME, OPTIM_NAME):
            (folder / (name + PENDING)).unlink(missing_ok=True)


def load_checkpoint(folder: Path, task: Task,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The saved state (weights and optimizer loaded), or None without a complete one."""
    if folder.is_dir():
        settle_checkpoint(folder)
    state = read_json(folder / STATE_NAME)
    if state is None:
        return None
    saved = {k: v for k, v in state.get("settings", {}).items() if k != "steps"}
    if "weights" in saved and saved["weights"] is None:
        del saved["weights"]  # a plain causal LM's base weights went unrecorded before
    # a setting the checkpoint does not record (written before it was recorded) is not held
    # against it; every recorded one must match
    wanted = {k: v for k, v in task.settings.items() if k != "steps" and k in saved}
    if saved != wanted:
        diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise CheckpointError(
            f"{folder} was saved by a run with other settings ({', '.join(diff)} differ: "
            f"{ {k: saved.get(k) for k in diff} } there, { {k: wanted.get(k) for k in diff} } "
            "now); use another output_dir, or start over with resume=False (--no-resume on "
            "the command line)" + (
                ". A model tuned in this session (by a run that was interrupted, say) no longer "
                "has the weights it started with: load it again to resume" if "weights" in diff
                else "")
        )
    load_unique_state_dict(task.module, load_file(str(folder / WEIGHTS_NAME), device="cpu"),
                           str(folder / WEIGHTS_NAME))
    device = next(iter(task.params)).device if task.params else None
    load_optimizer_state(optimizer, load_file(str(folder / OPTIM_NAME), device="cpu"),
                         state.pop("optimizer"), device)
    return state


# -- the loop ------------------------------------------------------------------------------
def run_task(
    task: Task, loop: LoopSettings, folder: Path | None = None, resume: bool = True,
    progress: bool = True, desc: str = "training",
) -> LoopState:
    """Train ``task`` for ``loop.steps`` steps (continuing a checkpoint in ``folder``)."""
    settings = dict(task.settings, steps=loop.steps, lr=loop.lr, schedule=loop.schedule,
                    warmup_steps=loop.warmup_steps, min_lr_ratio=loop.min_lr_ratio,
                    weight_decay=loop.weight_decay, max_grad_norm=loop.max_grad_norm)
    task.settings = settings
    optimizer = torch.optim.AdamW(task.params, lr=loop.lr, weight_decay=loop.weight_decay)
    with only_training(task.root, task.params):
        task.root.eval()
        state = load_checkpoint(folder, task, optimizer) if (
            folder is not None and resume) else None
        if state is None:
            task.setup()
            state = {"settings": settings, "step": 0, "loss_history": [], "part_history": {},
                     "before": task.evaluate()}
        start = int(state["step"])
        if start > loop.steps:  # range(start, steps) would be empty: the longer run returned
            raise CheckpointError(
                f"the checkpoint in {folder} is at step {start}, past the {loop.steps} steps "
                "asked for: give at least that many steps to continue it, or start over "
                "with resume=False (--no-resume on the command line)")
        bar = tqdm(total=loop.steps, initial=min(start, loop.steps), desc=desc, leave=False,
                   disable=not progress or start >= loop.steps)
        # warmup at most a tenth of the run: a short run would never reach lr otherwise
        warmup = min(loop.warmup_steps, loop.steps // 10)
        for step in range(start, loop.steps):
            task.train_mode()
            scale = lr_scale(loop.schedule, step, loop.steps, warmup, loop.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = loop.lr * scale
            total, parts = task.step_loss(step)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if loop.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(task.params, loop.max_grad_norm)
            optimizer.step()
            value = float(total.detach())
            state["step"] = step + 1
            state["loss_history"].append(value)
            for name, v in parts.items():
                state["part_history"].setdefault(name, [None] * step).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if folder is not None and (
                    (step + 1) % loop.save_every == 0 or step + 1 == loop.steps):
                save_checkpoint(folder, task, optimizer, state)
        bar.close()
        task.root.eval()
        after = task.evaluate()
    return LoopState(step=int(state["step"]), start_step=start,
                     loss_history=list(state["loss_history"]),
                     part_history={k: list(v) for k, v in state["part_history"].items()},
                     before=dict(state["before"]), after=after)

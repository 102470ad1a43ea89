"""What every decoder-LM objective shares: its config base class, the registry, the result.

An objective is one file in this folder that defines a config (a dataclass derived from
:class:`ObjectiveConfig`, registered by name with :func:`register_objective`), its pure loss
functions, and ``build(model, data, tokenizer)`` on the config, which returns a
:class:`~exitwise.lm.loop.Task` for the one loop. Configs check themselves when made, so a
bad option fails before any model work, with the option's name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ...errors import ConfigError
from ...registry import Registry
from ..loop import SCHEDULES, LoopSettings, Task

OBJECTIVES: Registry[type[ObjectiveConfig]] = Registry("objective")
register_objective = OBJECTIVES.register  # class decorator: @register_objective("name")


def get_objective(name: str, **options: Any) -> ObjectiveConfig:
    """The config of objective ``name`` with ``options`` (unknown options are refused)."""
    cls = OBJECTIVES.get(name)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    foreign = sorted(set(options) - known)
    if foreign:
        raise ConfigError(
            f"objective {name!r} has no option {', '.join(foreign)}; its options: "
            f"{', '.join(sorted(known))}"
        )
    return cls(**options)


def is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ObjectiveConfig:
    """Options every objective has (each subclass sets its own defaults).

    lr: AdamW's learning rate after ``warmup_steps`` of linear warmup (at most a tenth of
        the run's steps: a short run otherwise never reaches ``lr``), then ``schedule``
        ("constant", "cosine" to ``min_lr_ratio`` x lr, "linear" to 0). weight_decay: AdamW's.
    max_grad_norm: clip the gradient norm (None: no clipping). batch_size: sequences (or
        answers, or tokens for ``calm``) per step. eval_fraction: share held out to measure
        before / after. save_every: checkpoint period in steps (with an ``output_dir``).
    seed: every random choice (split, batches, dropped layers) derives from it.
    """

    registered_name: ClassVar[str] = ""
    lr: float = 1e-3
    batch_size: int = 8
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    eval_fraction: float = 0.1
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        for name in ("batch_size", "save_every"):
            if not is_pos_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive int; got {getattr(self, name)!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be a positive number; got {self.lr!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or (
                self.warmup_steps < 0):
            raise ConfigError(f"warmup_steps must be an int >= 0; got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; "
                              f"got {self.schedule!r}")
        if not is_number(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be a number >= 0; got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (
                not is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ConfigError(f"max_grad_norm must be a positive number or None; "
                              f"got {self.max_grad_norm!r}")
        if not is_number(self.eval_fraction) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1); got {self.eval_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int; got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.registered_name, **asdict(self)}

    def loop_settings(self, steps: int) -> LoopSettings:
        return LoopSettings(
            steps=steps, lr=float(self.lr), schedule=self.schedule,
            warmup_steps=self.warmup_steps, min_lr_ratio=float(self.min_lr_ratio),
            weight_decay=float(self.weight_decay), max_grad_norm=self.max_grad_norm,
            save_every=self.save_every,
        )

    def build(self, model: Any, data: Any, tokenizer: Any, output_dir: Any,
              progress: bool = True) -> Prepared:
        """The task for the loop, how many steps, and how to report (see subclasses)."""
        raise NotImplementedError


@dataclass
class Prepared:
    """An objective made ready: the loop's task and step count, what to report, and what to
    do when training ends (``finish(result)``, e.g. mark the backbone as tuned)."""

    task: Task
    steps: int
    metric: str
    num_train: int
    num_eval: int
    extras: dict[str, Any] = field(default_factory=dict)
    finish: Any = None


@dataclass
class TuningResult:
    """What :func:`exitwise.lm.tune_exits` did.

    before / after: the objective's held-out ``metric`` (``"agreement"``: share of real
        tokens where the exit's top-1 equals the final layer's or, for ``answers``, the
        answer's next token; ``"bce"`` for ``calm``) per exit depth, measured before and
        after training. loss_history: the loss of every step (steps before a resume come
        from the checkpoint); part_history: each named part of the loss per step (None where
        the part was off, e.g. a layer outside LayerSkip's curriculum at that step).
    extras: objective-specific facts (e.g. LayerSkip's dropout rates, CALM's AUC);
    artifact: what the objective produces besides weights (CALM's classifier).
    """

    objective: str
    config: dict[str, Any]
    metric: str
    steps: int
    start_step: int
    loss_history: list[float]
    part_history: dict[str, list[float | None]]
    before: dict[Any, float]
    after: dict[Any, float]
    num_train: int
    num_eval: int
    output_dir: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    artifact: Any = None

    @property
    def final_loss(self) -> float | None:
        return self.loss_history[-1] if self.loss_history else None

    def table(self) -> str:
        """Before / after per exit, as people read it."""
        rows = [f"exit  {self.metric + '_before':>16}  {self.metric + '_after':>15}"]
        for key in self.before:
            rows.append(f"{key!s:>4}  {self.before[key]:>16.3f}  {self.after[key]:>15.3f}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "artifact"}
        out["final_loss"] = self.final_loss
        return out

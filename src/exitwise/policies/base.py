"""Exit policies: decide, exit by exit, which rows stop.

A policy sees only logits and its own per-row state, never the model. The executor and the
offline replay call the same :meth:`ExitPolicy.decide`, which is what makes their decisions
agree. State is a dict of tensors with the batch on dim 0, so dropping rows that exited is
one ``index_select`` (:meth:`keep`).

Each policy has one tunable parameter (``param``: a threshold, a patience or an exit index)
that calibration searches over with :meth:`grid` and sets with :meth:`with_param`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, InputError
from ..registry import Registry

POLICIES: Registry[type["ExitPolicy"]] = Registry("exit policy")
register_policy = POLICIES.register

PolicyState = dict[str, torch.Tensor]


class ExitPolicy:
    """Base class.

    Subclasses set ``param`` (the name of the tuned parameter), ``param_range`` (closed
    bounds, checked on construction) and implement :meth:`decide` and :meth:`grid`.
    """

    registered_name: ClassVar[str] = "?"
    param: ClassVar[str] = "threshold"
    param_range: ClassVar[tuple[float, float]] = (-math.inf, math.inf)
    needs_labels: ClassVar[bool] = False
    # Which way the tuned parameter makes the policy exit less ("higher": a higher value is
    # safer, closer to full depth; "lower": a lower one; None: not monotone / not declared).
    # Certified calibration tests settings from the safest on (fixed-sequence testing).
    safer_when: ClassVar[str | None] = None
    # The tasks the rule means something for: a regression head outputs one value per row,
    # on which confidence or entropy says nothing.
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    # True for policies that read a learned per-row exit score (the model's exit scorer,
    # :mod:`exitwise.heads.scorer`): the executor and the replay then pass ``scores=`` (B,)
    # to :meth:`decide`; the others never receive it.
    uses_scores: ClassVar[bool] = False
    # Which exit scorer those scores must come from (its registered name), and the training
    # strategy that fits it: another scorer's scores mean something else (a certainty, a
    # consistency, a halting probability).
    scorer: ClassVar[str | None] = None
    scorer_strategy: ClassVar[str | None] = None
    # False for a policy with a stage its tuned parameter does not control (ELBERT's
    # confidence window): even its safest setting may exit rows early, so a drop target can
    # be out of reach (the search then returns its most accurate setting and says so).
    reaches_full_depth: ClassVar[bool] = True
    # A policy whose table comes from its own fitting function (named here) instead of a
    # search over ``param``: without that table it runs every row to full depth.
    fitted_by: ClassVar[str | None] = None

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)
        if self.param in params:
            value = params[self.param]
            # "0.9", None or True would pass here and fail deep inside torch at the first
            # comparison (or, as True, mean 1)
            if value is None or isinstance(value, (bool, str)) or not isinstance(
                    value, numbers.Real):
                raise ConfigError(f"{self.registered_name}: {self.param} must be a number; "
                                  f"got {value!r}")
            self._check_range(self.param, value, self.param_range)

    # -- helpers -----------------------------------------------------------------------------
    def check_scorer(self, name: str | None, present: bool = True) -> None:
        """For a policy that reads learned scores: ``present`` (the model or cache has
        scores) and ``name`` (their scorer; None: not recorded, as in older caches) must be
        the ones it reads."""
        if not self.uses_scores:
            return
        fit = f"train it with the {self.scorer_strategy!r} strategy, which fits that scorer"
        if not present:
            raise InputError(f"policy {self.registered_name!r} reads the {self.scorer!r} exit "
                             f"scorer's scores, but there are none: {fit}")
        if name is not None and name != self.scorer:
            raise InputError(f"policy {self.registered_name!r} reads the {self.scorer!r} exit "
                             f"scorer's scores, but these come from the {name!r} scorer: {fit}, "
                             f"or use the policy that reads {name!r}")

    @property
    def value(self) -> Any:
        return self.params.get(self.param)

    def _check_range(self, name: str, value: Any, bounds: tuple[float, float]) -> None:
        lo, hi = bounds
        try:
            ok = lo <= float(value) <= hi and not math.isnan(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{self.registered_name}: {name}={value!r} is outside its range [{lo}, {hi}]"
            )

    def with_param(self, value: Any) -> "ExitPolicy":
        """A copy of this policy with its tuned parameter set to ``value``."""
        return type(self)(**{**self.params, self.param: value})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.registered_name, **self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # -- the contract ------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> PolicyState:
        """Fresh per-row state for a batch. Default: stateless."""
        return {}

    def decide(
        self,
        exit_index: int,
        num_exits: int,
        logits: torch.Tensor,
        state: PolicyState,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PolicyState]:
        """Rows that exit here.

        exit_index: which exit (0-based) produced ``logits``; num_exits: how many there are.
        logits: (B, C) temperature-scaled logits of the rows still running.
        Returns a (B,) bool tensor and the updated state. The executor forces an exit at the
        last exit regardless.
        """
        raise NotImplementedError  # pragma: no cover

    def output_logits(
        self, exit_index: int, num_exits: int, logits: torch.Tensor, state: PolicyState
    ) -> torch.Tensor:
        """(B, C) what a row returns when it leaves at ``exit_index``, given the state it had
        *before* this exit's :meth:`decide`. Default: the exit's own (temperature-scaled)
        logits; ensemble policies (``ztw``) return the ensemble's log-probabilities."""
        return logits

    @property
    def transforms_output(self) -> bool:
        """True when :meth:`output_logits` is overridden (the executor and replay call it)."""
        return type(self).output_logits is not ExitPolicy.output_logits

    def grid(self, num_exits: int) -> list[float]:
        """Candidate parameter values for a calibration sweep (cheap to expensive or either)."""
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def keep(state: PolicyState, rows: torch.Tensor) -> PolicyState:
        return {k: v.index_select(0, rows) for k, v in state.items()}

    def check_task(self, task: str) -> None:
        """ConfigError when this criterion does not apply to ``task``."""
        if task not in self.tasks:
            usable = sorted(n for n in POLICIES.names() if task in POLICIES.get(n).tasks)
            raise ConfigError(
                f"policy {self.registered_name!r} is a {'/'.join(self.tasks)} criterion and "
                f"cannot decide on a {task} model; use one of {', '.join(usable)}"
            )

    @staticmethod
    def check_logits(logits: torch.Tensor) -> None:
        if logits.dim() != 2:
            raise InputError(f"a policy needs (batch, classes) logits, got {tuple(logits.shape)}")
        if not bool(torch.isfinite(logits).all()):
            raise InputError("exit logits contain NaN or inf; the model or its inputs are broken")


def get_policy(name: str, **params: Any) -> ExitPolicy:
    """Build a registered policy: ``get_policy("entropy", threshold=0.2)``."""
    cls = POLICIES.get(name)
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"bad parameters for policy {name!r}: {err}") from None


def policy_from_dict(data: dict[str, Any]) -> ExitPolicy:
    data = dict(data)
    return get_policy(data.pop("name"), **data)

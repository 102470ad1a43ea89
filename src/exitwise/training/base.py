"""The training-strategy contract: a recipe is a list of stages.

A :class:`Stage` says which parameters train (everything else is frozen for that stage) and
how the loss is computed from the model's :class:`~exitwise.outputs.ExitOutputs` and the
labels. The training loop (:mod:`exitwise.training.loop`) runs the stages one after another,
each with its own Hugging Face ``Trainer``. Adding a recipe is one new file that subclasses
:class:`TrainingStrategy` and registers it with :func:`register_strategy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..outputs import ExitOutputs
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

LossFn = Callable[[ExitOutputs, torch.Tensor], torch.Tensor]
ParamSelector = Callable[["MultiExitModel"], Iterable[nn.Parameter]]


@dataclass
class Stage:
    """One phase of a recipe.

    name: folder name of the stage under the run's output_dir (``stage-1``, ``stage-2``, ...).
    trainable: ``model -> parameters`` that train in this stage; all others are frozen.
    loss: ``(outputs, labels) -> scalar``; ``outputs.logits[k]`` is (B, C), labels (B,).
    args: TrainingArguments overrides for this stage only (e.g. a larger learning rate for
        the heads-only stage).
    """

    name: str
    trainable: ParamSelector
    loss: LossFn
    args: dict[str, Any] = field(default_factory=dict)

    def trainable_names(self, model: MultiExitModel) -> set[str]:
        """Qualified names of the parameters that train in this stage (aliases included)."""
        chosen = {id(p) for p in self.trainable(model)}
        return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in chosen}


class TrainingStrategy:
    """Base class of training recipes.

    Subclasses implement :meth:`build_stages` and set ``tunes_backbone`` (True when any stage
    updates backbone weights; the loop then sets ``model.backbone_tuned`` so saving writes
    the backbone too).

    ``stage_args``: optional list (one dict per stage) of TrainingArguments overrides, merged
    over the recipe's own per-stage defaults.
    """

    registered_name: str = "?"
    tunes_backbone: bool = True

    def __init__(self, stage_args: Sequence[dict[str, Any]] | None = None) -> None:
        self.stage_args = [dict(a) for a in stage_args] if stage_args is not None else None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:  # pragma: no cover
        raise NotImplementedError

    def stages(self, model: MultiExitModel) -> list[Stage]:
        """The recipe's stages for ``model``, with ``stage_args`` overrides applied."""
        stages = self.build_stages(model)
        if self.stage_args is not None:
            if len(self.stage_args) != len(stages):
                raise ConfigError(
                    f"strategy {self.registered_name!r} has {len(stages)} stage(s) but "
                    f"stage_args gives {len(self.stage_args)}"
                )
            for stage, extra in zip(stages, self.stage_args):
                stage.args = {**stage.args, **extra}
        return stages

    def options(self) -> dict[str, Any]:
        """JSON-able settings, recorded in the run folder so that a resume can check them."""
        return {"stage_args": self.stage_args}

    def describe(self) -> dict[str, Any]:
        return {"name": self.registered_name, **self.options()}


STRATEGIES: Registry[type[TrainingStrategy]] = Registry("training strategy")
register_strategy = STRATEGIES.register


def get_strategy(name: str | TrainingStrategy, **options: Any) -> TrainingStrategy:
    """A strategy object from a registered name and its options (or the object itself)."""
    if isinstance(name, TrainingStrategy):
        if options:
            raise ConfigError("give options either to the strategy object or here, not both")
        return name
    cls = STRATEGIES.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ConfigError(f"bad options for training strategy {name!r}: {err}") from None


# -- building blocks shared by recipes -----------------------------------------------------
def backbone_parameters(model: MultiExitModel) -> list[nn.Parameter]:
    return list(model.backbone.parameters())


def head_parameters(
    model: MultiExitModel, exits: Iterable[int] | None = None
) -> list[nn.Parameter]:
    """Parameters of the heads at exit indices ``exits`` (all heads when None)."""
    indices = range(model.num_exits) if exits is None else exits
    return [p for k in indices for p in model.heads[k].parameters()]


def exit_cross_entropy(outputs: ExitOutputs, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean cross-entropy of exit ``k``: logits (B, C) against labels (B,), in float32."""
    return F.cross_entropy(outputs.logits[k].float(), labels)


def weighted_exit_loss(weights: Sequence[float]) -> LossFn:
    """``sum_k w_k * CE(logits_k, labels)``; exits with weight 0 are skipped."""
    w = [float(x) for x in weights]

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        if len(outputs.logits) != len(w):
            raise ConfigError(f"{len(w)} exit weights for a model with {len(outputs.logits)} exits")
        terms = [wk * exit_cross_entropy(outputs, labels, k) for k, wk in enumerate(w) if wk]
        return torch.stack(terms).sum()

    return loss

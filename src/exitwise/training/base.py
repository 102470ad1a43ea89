"""The training-strategy contract: a strategy is a list of stages.

A :class:`Stage` says which parameters train (everything else is frozen for that stage) and
how the loss is computed from the model's :class:`~exitwise.outputs.ExitOutputs` and the
labels. The training loop (:mod:`exitwise.training.loop`) runs the stages one after another,
each with its own Hugging Face ``Trainer``. Adding a strategy is one new file that subclasses
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
from ..heads.native import NativeHead
from ..outputs import ExitOutputs
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

LossFn = Callable[[ExitOutputs, torch.Tensor], torch.Tensor]
ParamSelector = Callable[["MultiExitModel"], Iterable[nn.Parameter]]
# (model as the Trainer holds it, backbone inputs, labels (B,)) -> (loss, outputs or None)
StepFn = Callable[
    [nn.Module, dict[str, Any], torch.Tensor], "tuple[torch.Tensor, ExitOutputs | None]"
]


@dataclass
class TrainingProgress:
    """Where training is, for losses that change with it (SDN's ramped exit weights).

    The trainer updates it in place before every loss computation; outside training it keeps
    its defaults (``num_epochs`` None: "not training", strategies then use their final setting).

    step: optimizer steps done so far; max_steps: total planned.
    epoch: fractional epochs done so far (the Trainer's ``state.epoch``); num_epochs: planned.
    learning_rate: the learning rate of the coming step (meta-learning look-aheads use it).
    """

    step: int = 0
    max_steps: int | None = None
    epoch: float = 0.0
    num_epochs: int | None = None
    learning_rate: float | None = None

    @property
    def fraction(self) -> float | None:
        """Share of the planned steps done, in [0, 1] (None outside training)."""
        if not self.max_steps:
            return None
        return min(1.0, self.step / self.max_steps)


@dataclass
class Stage:
    """One phase of a strategy.

    name: folder name of the stage under the run's output_dir (``stage-1``, ``stage-2``, ...).
    trainable: ``model -> parameters`` that train in this stage; all others are frozen.
    loss: ``(outputs, labels) -> scalar``; ``outputs.logits[k]`` is (B, C), labels (B,).
    args: TrainingArguments overrides for this stage only (e.g. a larger learning rate for
        the heads-only stage).
    forward_kwargs: extra keywords for ``model.forward`` during training
        (``return_features=True``, ``grad_scales=[...]``).
    step: optional custom training step ``(model, inputs, labels) -> (loss, outputs)``
        replacing "forward, then ``loss``" (meta-learning strategies run their look-ahead and
        meta update in it); the Trainer still backpropagates the returned loss and steps the
        optimizer. ``loss`` stays the stage's objective for evaluation.
    progress: training progress, updated in place by the trainer (read by ``loss``/``step``).
    """

    name: str
    trainable: ParamSelector
    loss: LossFn
    args: dict[str, Any] = field(default_factory=dict)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    step: StepFn | None = None
    progress: TrainingProgress = field(default_factory=TrainingProgress)

    def trainable_names(self, model: MultiExitModel) -> set[str]:
        """Qualified names of the parameters that train in this stage (aliases included)."""
        chosen = {id(p) for p in self.trainable(model)}
        return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in chosen}


class TrainingStrategy:
    """Base class of training strategies.

    Subclasses implement :meth:`build_stages` and set ``tunes_backbone`` (True when any stage
    updates backbone weights; the loop then sets ``model.backbone_tuned`` so saving writes
    the backbone too).

    ``stage_args``: optional list (one dict per stage) of TrainingArguments overrides, merged
    over the strategy's own per-stage defaults.
    """

    registered_name: str = "?"
    tunes_backbone: bool = True
    # Tasks the strategy's losses mean something for (distillation between class distributions
    # does not apply to a regression output); the training loop refuses the others.
    tasks: tuple[str, ...] = ("classification",)
    # The fewest rows a training batch may have (meta-learning recipes cut each batch in two
    # halves); the loop drops a shorter last batch of an epoch instead of failing on it.
    min_batch_rows: int = 1

    def __init__(self, stage_args: Sequence[dict[str, Any]] | None = None) -> None:
        self.stage_args = [dict(a) for a in stage_args] if stage_args is not None else None

    def build_stages(self, model: MultiExitModel) -> list[Stage]:  # pragma: no cover
        raise NotImplementedError

    # The exit rule the method's paper pairs with this training (a policy's registered name;
    # None: any): ``exitwise calibrate`` calibrates it beside its defaults.
    exit_policy: str | None = None

    def check(self, model: MultiExitModel) -> None:
        """ConfigError when the strategy cannot train ``model`` (cheap: it runs before a
        run folder is cleared); default: nothing beyond the task, checked by the loop."""

    def stages(self, model: MultiExitModel) -> list[Stage]:
        """The strategy's stages for ``model``, with ``stage_args`` overrides applied."""
        self.check(model)
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


# -- building blocks shared by strategies ---------------------------------------------------
def backbone_parameters(model: MultiExitModel) -> list[nn.Parameter]:
    return list(model.backbone.parameters())


def head_parameters(
    model: MultiExitModel, exits: Iterable[int] | None = None
) -> list[nn.Parameter]:
    """Parameters of the heads at exit indices ``exits`` (all heads when None)."""
    indices = range(model.num_exits) if exits is None else exits
    return [p for k in indices for p in model.heads[k].parameters()]


def later_exits(model: MultiExitModel) -> list[nn.Module]:
    """The heads after the first that a recipe links to the exits before them (cascades,
    boosting, inline collaboration): all of them, except a final exit that is the network's
    own classifier (head ``native``), which predicts alone."""
    later = list(model.heads[1:])
    if later and isinstance(later[-1], NativeHead):
        later.pop()
    return later


def exit_cross_entropy(outputs: ExitOutputs, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Mean cross-entropy of exit ``k``: logits (B, C) against labels (B,), in float32."""
    return F.cross_entropy(outputs.logits[k].float(), labels)


def exit_task_loss(outputs: ExitOutputs, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Exit ``k``'s loss for its task, as Hugging Face's sequence classifiers compute it:
    cross-entropy for (B, C > 1) logits, mean squared error for (B, 1) regression outputs."""
    logits = outputs.logits[k].float()
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def exit_task_losses(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    """(E,) every exit's :func:`exit_task_loss`, shallowest first."""
    return torch.stack([exit_task_loss(outputs, labels, k) for k in range(len(outputs.logits))])


def weighted_exit_loss(weights: Sequence[float]) -> LossFn:
    """``sum_k w_k * loss_k`` (cross-entropy, or MSE for regression; see
    :func:`exit_task_loss`); exits with weight 0 are skipped."""
    w = [float(x) for x in weights]

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        if len(outputs.logits) != len(w):
            raise ConfigError(f"{len(w)} exit weights for a model with {len(outputs.logits)} exits")
        terms = [wk * exit_task_loss(outputs, labels, k) for k, wk in enumerate(w) if wk]
        return torch.stack(terms).sum()

    return loss


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's KD term ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean.

    student, teacher: (B, C) logits; the teacher is detached (it only gives targets).
    """
    t = float(temperature)
    target = F.log_softmax(teacher.detach().float() / t, -1)
    pred = F.log_softmax(student.float() / t, -1)
    return F.kl_div(pred, target, log_target=True, reduction="batchmean") * t * t


def soft_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``-sum_c softmax(teacher/T)_c log_softmax(student/T)_c``, batch mean; no ``T^2``.

    The distillation term of BYOT's reference (``CrossEntropy`` in
    ``ArchipLab-LinfengZhang/pytorch-self-distillation-final/train.py``): a cross-entropy
    against the teacher's softened distribution, equal to the KL divergence plus the teacher's
    (constant) entropy. student, teacher: (B, C) logits; the teacher is detached.
    """
    t = float(temperature)
    target = F.softmax(teacher.detach().float() / t, -1)
    return -(target * F.log_softmax(student.float() / t, -1)).sum(-1).mean()


def gradient_equilibrium_scales(num_exits: int) -> list[tuple[float, float]]:
    """IMTA's gradient equilibrium as ``MultiExitModel.forward(grad_scales=...)`` pairs.

    At exit k of K (0-based) the shared point is scaled by 1/(K-k) and the deeper trunk path
    by (K-k-1) after it, so the gradient reaching the blocks before exit k is the *mean* of the
    gradients of exits k..K-1 instead of their sum: (head path, trunk path) =
    (1/(K-k), (K-k-1)/(K-k)).
    """
    k_total = int(num_exits)
    return [(1.0 / (k_total - k), (k_total - k - 1) / (k_total - k)) for k in range(k_total)]


def check_distillation_options(alpha: float, temperature: float, name: str = "alpha"
                               ) -> tuple[float, float]:
    """Validate the (alpha in [0, 1], temperature > 0) of a distillation strategy; ``name``:
    what the strategy calls its weight (RomeBERT's gamma)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {alpha}")
    if not float(temperature) > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    return float(alpha), float(temperature)

"""Online exit selection on a stream: the real executor driven by a bandit (UEE-UCB).

A bandit such as :class:`~exitwise.policies.uee_ucb.UCBExitSelector` learns *across* inputs,
so it is not an :class:`~exitwise.policies.ExitPolicy` (whose state is per row, within a
batch). :func:`run_stream` composes it with the executor: per batch of the stream it asks the
selector for an exit, runs the batch for real up to that exit (the ``static`` rule: every row
leaves there, the deeper blocks are never computed), reads the class each exit on the way
predicted, and hands those to the selector, which computes its label-free reward and updates.
Labels, when the batches carry them, are only recorded for reporting.

:func:`exitwise.analysis.stream.replay_stream` makes the same choices offline on cached
logits, given the same rows in the same order and the same batch sizes.

The loop follows ``run_single_trial`` of the UEE-UCB reference (github.com/MLiONS/
MutiExitDNNs, ``Part2_UEE_UCB_Algorithm_Evaluation.ipynb``); the paper, the rule and the
deviations are in :mod:`exitwise.policies.uee_ucb`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import ConfigError, InputError
from ..modes import eval_mode
from ..policies.base import PolicyState
from ..policies.static import StaticPolicy
from .executor import run_early_exit

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


class ExitSelector(Protocol):
    """What the stream runners need of an online learner (UEE-UCB's
    :class:`~exitwise.policies.uee_ucb.UCBExitSelector` is one)."""

    @property
    def num_arms(self) -> int: ...  # pragma: no cover

    def select(self) -> int: ...  # pragma: no cover

    def update(self, arm: int, predictions: torch.Tensor) -> torch.Tensor: ...  # pragma: no cover

    def state_dict(self) -> dict[str, Any]: ...  # pragma: no cover


@dataclass
class StreamStep:
    """One decision of the stream: a batch of ``rows`` inputs all played at ``arm``.

    reward: the mean over the rows of the selector's reward at the played arm.
    predictions: (rows,) class each row got (at exit ``arm``). labels: (rows,) long, -1 where
    unknown (reporting only). flops: (rows,) float64 cost of each row.
    """

    arm: int
    exit_layer: int
    rows: int
    reward: float
    predictions: torch.Tensor
    labels: torch.Tensor
    flops: torch.Tensor


@dataclass
class StreamResult:
    """A stream's record: its steps in order and the selector's state at the end."""

    steps: list[StreamStep] = field(default_factory=list)
    selector_state: dict[str, Any] = field(default_factory=dict)

    @property
    def arms(self) -> list[int]:
        return [s.arm for s in self.steps]

    @property
    def sizes(self) -> list[int]:
        """Rows per step (give them to ``replay_stream(batch_size=...)`` to replay the
        stream)."""
        return [s.rows for s in self.steps]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.steps]

    @property
    def exit_index(self) -> torch.Tensor:
        """(N,) the exit each row left at."""
        return torch.tensor([s.arm for s in self.steps for _ in range(s.rows)], dtype=torch.long)

    @property
    def exit_layer(self) -> torch.Tensor:
        """(N,) each row's depth (blocks run)."""
        return torch.tensor([s.exit_layer for s in self.steps for _ in range(s.rows)],
                            dtype=torch.long)

    def _cat(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        parts = [getattr(s, name) for s in self.steps]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    @property
    def predictions(self) -> torch.Tensor:
        return self._cat("predictions", torch.long)

    @property
    def labels(self) -> torch.Tensor:
        return self._cat("labels", torch.long)

    @property
    def flops(self) -> torch.Tensor:
        return self._cat("flops", torch.float64)

    @property
    def accuracy(self) -> float:
        """Fraction of the labeled rows predicted right (nan if none is labeled)."""
        labels = self.labels
        known = labels >= 0
        if not bool(known.any()):
            return math.nan
        return float((self.predictions[known] == labels[known]).double().mean())

    def metrics(self) -> dict[str, Any]:
        """Scalars and per-step lists, JSON-able."""
        layers = self.exit_layer
        n = int(layers.numel())
        return {
            "num_steps": len(self.steps),
            "num_rows": n,
            "accuracy": self.accuracy,
            "mean_layers": float(layers.double().mean()) if n else math.nan,
            "mean_flops": float(self.flops.mean()) if n else math.nan,
            "mean_reward": (sum(s.reward * s.rows for s in self.steps) / n) if n else math.nan,
            "arm_counts": [int(c) for c in torch.bincount(
                self.exit_index, minlength=len(self.selector_state.get("costs", [])))],
            "arms": self.arms,
            "sizes": self.sizes,
            "rewards": self.rewards,
            "selector_state": self.selector_state,
        }


def stream_order(num_rows: int, seed: int = 0) -> list[int]:
    """A fixed-seed shuffle of ``range(num_rows)``: the order a stream visits a dataset that
    has none of its own (e.g. Movie Review), the same for the live run and the replay."""
    if num_rows < 0:
        raise InputError(f"num_rows must be >= 0, got {num_rows}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_rows, generator=g).tolist()


def check_stream_task(task: str, selector: ExitSelector, num_exits: int) -> None:
    """ConfigError unless the model (or cache) is a classifier with one arm per exit."""
    if task != "classification":
        raise ConfigError(
            "UEE-UCB learns from whether exits agree on the predicted class; a "
            f"{task} model outputs a value, not a class, so it has no such signal"
        )
    if selector.num_arms != num_exits:
        raise ConfigError(
            f"the selector has {selector.num_arms} arms but the model has {num_exits} exits: "
            "give one cost per exit (e.g. depth_costs(model.exit_layers, num_layers))"
        )


class _ObservedStatic(StaticPolicy):
    """``static`` at ``exit``, also keeping the class each exit on the way predicted.

    The executor calls :meth:`decide` at every exit before the last with the (B, C)
    temperature-scaled logits of the rows still running; with a static rule no row leaves
    before ``exit``, so each call sees the whole batch.
    """

    def __init__(self, exit: int = 0) -> None:
        super().__init__(exit=exit)
        self.seen: list[torch.Tensor] = []

    def decide(self, exit_index, num_exits, logits, state: PolicyState, labels=None):
        if exit_index < int(self.value):
            self.seen.append(logits.argmax(-1).cpu())
        return super().decide(exit_index, num_exits, logits, state, labels)


def split_batch(batch: Any) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A batch -> (backbone inputs, labels or None): dicts (HF collators; labels under
    ``labels`` or ``label``, removed), ``(inputs, labels)`` pairs (torchvision loaders;
    inputs a tensor of images or a dict of backbone inputs) or bare tensors (vision). The one
    reader of batches for streams, caches and cascades."""
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs.pop("label", None)
        return inputs, labels
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        if isinstance(batch[0], Mapping):  # (a dict of backbone inputs, labels): text
            return dict(batch[0]), batch[1]
        return {"pixel_values": batch[0]}, batch[1]
    if isinstance(batch, torch.Tensor):
        return {"pixel_values": batch}, None
    raise InputError(
        f"cannot read a batch of type {type(batch).__name__}: give dicts or (inputs, labels)"
    )


def report_labels(labels: Any, rows: int) -> torch.Tensor:
    """(rows,) long labels for reporting, -1 where unknown (None: all unknown)."""
    if labels is None:
        return torch.full((rows,), -1, dtype=torch.long)
    out = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if out.shape != (rows,):
        raise InputError(f"batch labels have shape {tuple(out.shape)} for {rows} rows")
    return out.long()


def run_stream(
    model: MultiExitModel,
    batches: Iterable[Any],
    selector: ExitSelector,
    device: torch.device | str | None = None,
) -> StreamResult:
    """Run ``batches`` in order through the real executor, each at the exit ``selector``
    picks, and teach the selector from what the exits predicted (no labels used).

    batches: dicts of backbone inputs (input_ids (B, T), attention_mask (B, T), ...;
        ``labels`` (B,) optional, for reporting only), or ``(inputs, labels)`` pairs. One arm
        per batch: batches of one make one decision per input, as in the paper.
    selector: e.g. ``UCBExitSelector(depth_costs(model.exit_layers, num_layers))``; it is
        updated in place, so a stream can be continued with another call (or resumed from
        ``result.selector_state``).
    The model runs in eval mode and is put back as it was.
    """
    check_stream_task(model.task, selector, model.num_exits)
    if model.gate is not None:  # a row that skipped the chosen exit's block cannot stop there
        raise InputError(
            "online exit choice stops every row of a batch at the chosen exit; a model with a "
            "skip gate lets rows skip that exit's block, so it cannot stream (detach the gate "
            "or choose exits per row with a policy)")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    result = StreamResult()
    with eval_mode(model):
        for batch in batches:
            inputs, labels = split_batch(batch)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
            arm = int(selector.select())
            policy = _ObservedStatic(exit=arm)
            out = run_early_exit(model, policy, **inputs)
            rows = int(out.exit_index.numel())
            if not bool((out.exit_index == arm).all()):  # pragma: no cover - static rule
                raise RuntimeError("the executor did not stop every row at the chosen exit")
            # exits 0..arm-1 from the executor's calls to decide, exit ``arm`` from its output
            preds = torch.stack([*policy.seen, out.logits.argmax(-1).cpu()], dim=1)
            rewards = selector.update(arm, preds)
            result.steps.append(StreamStep(
                arm=arm, exit_layer=int(model.exit_layers[arm]), rows=rows,
                reward=float(rewards.mean()), predictions=preds[:, arm].clone(),
                labels=report_labels(labels, rows), flops=out.flops.detach().cpu().double(),
            ))
    result.selector_state = selector.state_dict()
    return result


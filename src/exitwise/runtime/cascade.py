"""Executing a cascade of complete models (CascadeBERT, Li et al., Findings of EMNLP 2021).

Instead of exits inside one network, a cascade (:class:`exitwise.cascade.ModelCascade`) holds
complete models of increasing size (e.g. the first two blocks of a checkpoint, then the whole
checkpoint), each fine-tuned on the task (:mod:`exitwise.training.cascadebert`).
:func:`run_cascade` runs the smallest member on the batch; an exit policy (per row, on that
member's logits) decides which rows are done; only the other rows go on to the next member, as
a really smaller batch (their inputs re-indexed and trailing padding trimmed); the last member
takes every row still running.

Each member is a :class:`~exitwise.model.MultiExitModel` used at full depth: its output is
``member.full_depth(...)`` (the backbone's own forward and its final exit's head), divided by
its final exit's temperature. A row that leaves at member m has spent the full-depth FLOPs
(:func:`exitwise.runtime.flops.full_depth_cost`) of members 0..m, on its own real tokens.

The policy is any per-row :class:`~exitwise.policies.base.ExitPolicy` (members play the part of
exits: ``decide(m, M, logits, state)``, its state carried across members as the executor
carries it across exits), a float (the ``confidence`` policy at that threshold: CascadeBERT's
rule), or one threshold per member boundary (see :func:`cascade_policy`). The offline
counterpart, making the same decisions on cached member logits, is
:mod:`exitwise.analysis.cascade`.

Reference: lancopku/CascadeBERT, ``cascade_bert.py``
(``CascadeBERTForSequenceClassification.forward``, ``infer_mode == 'cascade'``) and
``trainer.py`` (``CascadeBERTTrainer.prediction_loop``: a row's cost is the sum of the layers
of the models it went through). The paper's full text could not be read here (its abstract
only); the rule follows the reference code. Deviations: the reference runs every model on the
whole batch and then picks each row's output (its ``TODO: use dynamic forward in inference``);
here later members really run on the remaining rows only. The reference exits on
``confidence > threshold``; the ``confidence`` policy exits on ``>=`` (they differ only on an
exact tie). The reference counts layers; here FLOPs per row (embeddings, blocks on real
tokens, the final head) are counted as well, and ``exit_layer`` reports the blocks run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, InputError
from ..modes import for_inference
from ..outputs import EarlyExitResult
from ..policies.base import ExitPolicy, get_policy
from .flops import full_depth_cost, padded
from .timing import time_interleaved

if TYPE_CHECKING:  # pragma: no cover
    from ..cascade import ModelCascade
    from ..model import MultiExitModel

PolicySpec = ExitPolicy | float | Sequence[float] | None


@dataclass
class CascadeResult(EarlyExitResult):
    """What :func:`run_cascade` returns (an :class:`~exitwise.outputs.EarlyExitResult` whose
    exits are the members).

    logits:         (B, C) temperature-scaled output of the member each row left at.
    exit_index:     (B,) the member each row left at (also :attr:`member`).
    exit_layer:     (B,) blocks run for the row, summed over the members it went through.
    flops:          (B,) float64 FLOPs of the row: full depth of every member it went through.
    executed_flops: FLOPs executed including padding, summed over the batch.
    rows_per_layer: rows entering each member (also :attr:`rows_per_member`).
    layer_seconds:  wall-clock per member, when profiling.
    """

    @property
    def member(self) -> torch.Tensor:
        return self.exit_index

    @property
    def rows_per_member(self) -> list[int]:
        return self.rows_per_layer


def cascade_policy(spec: PolicySpec, num_members: int) -> ExitPolicy:
    """The exit policy a cascade of ``num_members`` runs for ``spec``.

    spec: an :class:`ExitPolicy` (returned as is); a float (``confidence`` at that threshold);
        a sequence of ``num_members - 1`` floats, one threshold per member boundary (one
        value: ``confidence``; more: a one-row ``budget`` table, which exits at member m on
        ``max p >= t_m``).
    """
    if isinstance(spec, ExitPolicy):
        return spec
    if spec is None:
        raise InputError("give a policy or a confidence threshold (this cascade stores none)")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return get_policy("confidence", threshold=float(spec))
    if isinstance(spec, (list, tuple)):
        values = list(spec)
        if len(values) != num_members - 1:
            raise ConfigError(f"{len(values)} thresholds for a cascade of {num_members} members "
                              f"(need one per member but the last: {num_members - 1})")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in values):
            raise ConfigError(f"thresholds must be numbers, got {values!r}")
        if len(values) == 1:
            return get_policy("confidence", threshold=float(values[0]))
        bad = [t for t in values if not 0.0 <= float(t) <= 1.0]
        if bad:
            raise ConfigError(f"confidence thresholds must be in [0, 1], got {bad}")
        return get_policy("budget", budget=1.0, budgets=[1.0],
                          thresholds=[[float(t) for t in values]])
    raise ConfigError(f"a cascade policy is an ExitPolicy, a threshold or a list of thresholds; "
                      f"got {type(spec).__name__}")


def check_cascade_policy(policy: ExitPolicy, task: str) -> None:
    """Refuse what a cascade cannot run: learned exit scores, ensemble outputs, a criterion
    that does not apply to ``task``."""
    if policy.uses_scores:
        raise InputError(f"policy {policy.registered_name!r} reads a learned exit score; "
                         "cascade members are used at full depth, without exit scorers")
    if policy.transforms_output:
        raise InputError(f"policy {policy.registered_name!r} changes what a row returns "
                         "(an ensemble over exits); a cascade returns a member's output")
    policy.check_task(task)


def _batch_size(inputs: dict[str, Any]) -> int:
    ref = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if ref is None:
        ref = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
    if ref is None or ref.dim() == 0:
        raise InputError("the cascade needs batched tensor inputs (input_ids, ...)")
    return int(ref.shape[0])


def take_rows(inputs: dict[str, Any], rows: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """The inputs of ``rows`` only: every tensor with the batch on dim 0 is index-selected
    (others pass unchanged); then, with right padding, sequence columns that are padding for
    every remaining row are dropped (as the executor's ``keep`` does), which changes no
    row's result."""
    out = {k: v.index_select(0, rows.to(v.device))
           if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch_size else v
           for k, v in inputs.items()}
    mask = out.get("attention_mask")
    n = int(rows.numel())
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == n:
        t = mask.shape[1]
        length = int(mask.sum(1).max())
        if length < t and not bool(mask[:, length:].any()):
            out = {k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() >= 2
                   and tuple(v.shape[:2]) == (n, t) else v for k, v in out.items()}
    return out


def run_cascade(
    members: Sequence[MultiExitModel],
    policy: ExitPolicy,
    labels: torch.Tensor | None = None,
    count_flops: bool = True,
    profile: bool = False,
    **inputs: Any,
) -> CascadeResult:
    """Run ``members`` (cheapest first, each at full depth) as a cascade on one batch.

    policy: decides at members 0..M-2 which rows stop (the last member takes the rest).
    labels: (B,) only for policies that need them (the oracle).
    inputs: what every member's backbone takes (input_ids (B, T), attention_mask ...).
    count_flops: fill ``flops`` / ``executed_flops`` (runs each member's embedding once more
        for the row lengths; off for timing loops).
    profile: record wall-clock per member (synchronizing the GPU).

    Members run in eval mode (each switched for the call when in train mode, its modules'
    modes restored after), as the single-model executor and the logits cache run them.
    """
    with ExitStack() as stack:
        for member in members:
            stack.enter_context(for_inference(member))
        return _run_cascade(members, policy, labels, count_flops, profile, **inputs)


@torch.inference_mode()
def _run_cascade(
    members: Sequence[MultiExitModel],
    policy: ExitPolicy,
    labels: torch.Tensor | None,
    count_flops: bool,
    profile: bool,
    **inputs: Any,
) -> CascadeResult:
    inputs.pop("labels", None)
    if not members:
        raise ConfigError("a model cascade needs at least one member")
    task = members[0].task
    check_cascade_policy(policy, task)
    if policy.needs_labels and labels is None:
        raise InputError(f"policy {policy.registered_name!r} needs labels")
    b = _batch_size(inputs)
    if labels is not None:
        labels = members[0].check_labels(labels, b)
    num = len(members)
    temps = [float(m.temperatures[-1]) for m in members]
    out_logits: torch.Tensor | None = None
    exit_index = torch.full((b,), -1, dtype=torch.long)
    exit_layer = torch.full((b,), -1, dtype=torch.long)
    flops = torch.zeros(b, dtype=torch.float64)
    executed = 0.0
    active = torch.arange(b)  # original ids of the rows still running (CPU)
    pstate: dict[str, torch.Tensor] | None = None
    rows_in: list[int] = []
    seconds: list[float] = []
    blocks = 0
    current = inputs
    for m, member in enumerate(members):
        t0 = time.perf_counter() if profile else 0.0
        rows_in.append(int(active.numel()))
        blocks += int(member.backbone.num_layers)
        logits = member.full_depth(**current)
        if count_flops:
            state = member.backbone.start(**current)
            flops[active] += full_depth_cost(member, state).cpu()
            executed += float(full_depth_cost(member, padded(state)).sum())
        if pstate is None:
            pstate = policy.init_state(logits.shape[0], logits.device)
        if temps[m] != 1.0:  # in float32, as replay scales the cached copy (bf16 rounds)
            logits = logits.float() / temps[m]
        policy.check_logits(logits)
        if out_logits is None:
            out_logits = torch.empty(b, logits.shape[-1], dtype=logits.dtype,
                                     device=logits.device)
        if m == num - 1:
            done = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        else:
            done, pstate = policy.decide(m, num, logits, pstate, labels)
        leave = done.nonzero().squeeze(1)
        rows = active[leave.cpu()]
        out_logits[rows.to(out_logits.device)] = logits[leave].to(out_logits.dtype)
        exit_index[rows] = m
        exit_layer[rows] = blocks
        if profile:
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            seconds.append(time.perf_counter() - t0)
        if leave.numel() == active.numel():
            break
        if leave.numel():
            stay = (~done).nonzero().squeeze(1)
            current = take_rows(current, stay, int(active.numel()))
            pstate = policy.keep(pstate, stay)
            if labels is not None:
                labels = labels[stay.to(labels.device)]
            active = active[stay.cpu()]
    assert out_logits is not None and bool((exit_index >= 0).all())
    return CascadeResult(
        logits=out_logits, exit_index=exit_index, exit_layer=exit_layer, flops=flops,
        executed_flops=executed, layer_seconds=seconds, rows_per_layer=rows_in, task=task,
    )


def time_cascade(
    cascade: ModelCascade,
    baseline: MultiExitModel,
    batches: Sequence[dict[str, torch.Tensor]],
    policies: dict[str, PolicySpec],
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Wall-clock of the plain ``baseline`` model (``full_depth``: its own forward and final
    head; usually the cascade's largest member) against the cascade with each policy,
    measured interleaved (:func:`exitwise.runtime.timing.time_interleaved`).

    Returns {"baseline": {...}, "<name>": {"median_s", "samples_s", "speedup"}}, times for one
    pass over ``batches`` (dicts of inputs; labels are dropped).
    """
    clean = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    resolved = {n: cascade_policy(p, cascade.num_members) for n, p in policies.items()}
    # GPU kernels run asynchronously: wait for the last one, so each sample times the work.
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def full() -> None:
        with torch.inference_mode():
            for b in clean:
                baseline.full_depth(**b)
        sync()

    def make(policy: ExitPolicy) -> Callable[[], None]:
        def go() -> None:
            for b in clean:
                cascade.run(policy, count_flops=False, **b)
            sync()

        return go

    fns: dict[str, Callable[[], Any]] = {"baseline": full}
    fns.update({n: make(p) for n, p in resolved.items()})
    samples = time_interleaved(fns, repeats=repeats, warmup=warmup)
    base = statistics.median(samples["baseline"])
    out: dict[str, Any] = {}
    for name, s in samples.items():
        med = statistics.median(s)
        out[name] = {"median_s": med, "samples_s": s,
                     "speedup": base / med if med > 0 else math.inf}
    return out


__all__ = ["CascadeResult", "PolicySpec", "cascade_policy", "check_cascade_policy",
           "run_cascade", "take_rows", "time_cascade"]

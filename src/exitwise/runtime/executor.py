"""The real early-exit executor.

Runs the backbone block by block; at each exit evaluates the head and asks the policy; rows
that exit are written out and removed from the batch (hidden states, masks, policy state,
labels, the previous exit's raw logits that cascade heads read and the earlier exits' states
that past-future heads read) so the remaining rows
run on a smaller batch. Nothing is simulated: the skipped blocks
are never computed.

A model with a skip gate (:mod:`exitwise.heads.skip_gate`) runs each block only on the rows
its gate lets in (``model.block_step``); a row that skipped the block an exit sits on is not
offered that exit (its decision there is masked), and its FLOPs count only the blocks it ran
plus the gates.

Inference runs in eval mode: a model still in train mode after training (``train`` returns it
so) is switched for the call and its modules' modes restored afterwards, so dropout stays off
and a BatchNorm neither normalizes with the batch nor updates its running statistics, exactly
as :func:`exitwise.analysis.collect_exit_logits` (what replay reads) runs it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from ..modes import for_inference
from ..outputs import EarlyExitResult
from ..policies.base import ExitPolicy
from .flops import exit_cost_table, head_mask, padded

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def run_early_exit(
    model: "MultiExitModel",
    policy: ExitPolicy,
    labels: torch.Tensor | None = None,
    profile: bool = False,
    count_flops: bool = True,
    **inputs: Any,
) -> EarlyExitResult:
    """Early-exit inference on one batch.

    inputs: what the backbone's ``start`` takes (input_ids (B, T), attention_mask (B, T) ...).
    labels: (B,) only for policies that need them (the oracle).
    profile: record wall-clock per block (adds a timer call per block).
    count_flops: fill ``flops`` (cheap; off only for the tightest timing loops).
    """
    with for_inference(model):  # see the module docstring: inference is in eval mode
        return _run_early_exit(model, policy, labels, profile, count_flops, **inputs)


@torch.inference_mode()
def _run_early_exit(
    model: "MultiExitModel",
    policy: ExitPolicy,
    labels: torch.Tensor | None,
    profile: bool,
    count_flops: bool,
    **inputs: Any,
) -> EarlyExitResult:
    if policy.needs_labels and labels is None:
        raise InputError(f"policy {policy.registered_name!r} needs labels")
    policy.check_task(model.task)
    scored = policy.uses_scores
    policy.check_scorer(getattr(model.scorer, "registered_name", None), model.scorer is not None)
    backbone = model.backbone
    heads = model.heads
    temps = model.temperature_list()
    exit_at = model.exit_lookup
    num_exits = len(heads)

    state = backbone.start(**inputs)
    b = state.batch_size
    device = state.hidden.device
    if labels is not None:
        labels = model.check_labels(labels, b)
    gated = model.gate is not None
    costs = exit_cost_table(model, state) if count_flops and not gated else None
    if gated:  # per-row costs depend on the blocks each row ran: tabled at the end
        first = replace(state, rows=dict(state.rows), shared=dict(state.shared))
        ran_blocks = torch.ones(b, backbone.num_layers, dtype=torch.bool)
    # Work really done on the (padded, shrinking) batch, summed over rows.
    executed = float(backbone.start_flops(padded(state)).sum()) if count_flops else 0.0

    out_logits: torch.Tensor | None = None
    exit_index = torch.full((b,), -1, dtype=torch.long)
    exit_layer = torch.full((b,), -1, dtype=torch.long)
    active = torch.arange(b, device=device)
    pstate = policy.init_state(b, device)
    layer_seconds: list[float] = []
    rows_per_layer: list[int] = []
    previous: torch.Tensor | None = None  # raw logits of the last exit, for cascade heads
    past: list[torch.Tensor] = []  # states of the earlier exits, for past-future heads

    for i in range(backbone.num_layers):
        work = None
        if count_flops:  # per row, on the padded batch; a gated row may skip the block
            work = backbone.layer_flops(i, padded(state)).cpu()
            if gated:
                executed += float(model.gate.gate_flops(i, padded(state).mask,
                                                         state.batch_size).sum())
        t0 = time.perf_counter() if profile else 0.0
        state, ran = model.block_step(i, state)
        rows_per_layer.append(int(active.numel()) if ran is None else int(ran.sum()))
        if ran is not None:
            ran_blocks[active.cpu(), i] = ran.cpu()
        if work is not None:
            executed += float(work.sum() if ran is None else work[ran.cpu()].sum())
        k = exit_at.get(i + 1)
        if k is not None:
            hidden, mask = backbone.features(state)
            score = None
            if scored:
                logits, score = model.exit_score(k, hidden, mask, previous, past)
            else:
                logits = model.head_logits(k, hidden, mask, previous, past)
            previous = logits
            if count_flops:
                full_mask = (torch.ones_like(mask) if mask is not None
                             else head_mask(backbone, i + 1, state, None))
                executed += float(heads[k].head_flops(full_mask, logits.shape[0]).sum())
                if model.scorer is not None and scored:
                    executed += float(model.scorer.scorer_flops(k, logits.shape[0]).sum())
            if temps[k] != 1.0:  # in float32, as replay scales the cached copy
                logits = logits.float() / temps[k]
            policy.check_logits(logits)
            if out_logits is None:
                out_logits = torch.empty(b, logits.shape[-1], dtype=logits.dtype, device=device)
            # What leaving rows return (an ensemble policy's output needs the state before
            # this exit's decision).
            emitted = (policy.output_logits(k, num_exits, logits, pstate)
                       if policy.transforms_output else logits)
            if k == num_exits - 1:
                done = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
            else:
                extra = {"scores": score} if scored else {}
                done, pstate = policy.decide(k, num_exits, logits, pstate, labels, **extra)
                if ran is not None:  # a row that skipped this exit's block is not offered it
                    done = done & ran
            n_done = int(done.sum())
            if n_done:
                if n_done == active.numel():
                    out_logits[active] = emitted.to(out_logits.dtype)
                    exit_index[active.cpu()] = k
                    exit_layer[active.cpu()] = i + 1
                    active = active[:0]
                else:
                    leave = done.nonzero().squeeze(1)
                    stay = (~done).nonzero().squeeze(1)
                    rows = active[leave]
                    out_logits[rows] = emitted[leave].to(out_logits.dtype)
                    exit_index[rows.cpu()] = k
                    exit_layer[rows.cpu()] = i + 1
                    active = active[stay]
                    state = backbone.keep(state, stay)
                    previous = previous[stay]
                    past = [p[stay] for p in past]
                    pstate = policy.keep(pstate, stay)
                    if labels is not None:
                        labels = labels[stay]
        if profile:
            if state.hidden.is_cuda:  # kernels run asynchronously: time the work, not launches
                torch.cuda.synchronize(state.hidden.device)
            layer_seconds.append(time.perf_counter() - t0)
        if active.numel() == 0:
            break

    assert out_logits is not None and bool((exit_index >= 0).all())
    if gated and count_flops:
        costs = exit_cost_table(model, first, ran_blocks)
    if costs is not None:
        flops = costs.gather(1, exit_index.unsqueeze(1)).squeeze(1)
    else:
        flops = torch.zeros(b, dtype=torch.float64)
    return EarlyExitResult(
        logits=out_logits,
        exit_index=exit_index,
        exit_layer=exit_layer,
        flops=flops,
        executed_flops=executed,
        layer_seconds=layer_seconds,
        rows_per_layer=rows_per_layer,
        task=model.task,
    )

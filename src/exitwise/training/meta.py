"""Shared pieces of the meta-learning recipes (``l2w``, ``meta_gf``).

Both take, at every training step, a one-step look-ahead of the model on the training half of
the batch (``theta' = theta - lr * g``, with ``torch.func.functional_call`` so the model's own
parameters are untouched), score ``theta'`` on the held-out (meta) half, and update their
meta-parameters by the gradient of that score. The meta-parameters live in the strategy (not
in the model), each with its own Adam optimizer; they are training-time state only.

The look-ahead runs on the unwrapped model in this process (single-process training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from ..outputs import ExitOutputs


def second_order_safe():
    """A context in which attention uses its plain (math) kernel: fused attention kernels
    have no second derivative, which a look-ahead through the weights' gradient needs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def unwrap(model: nn.Module) -> nn.Module:
    """The MultiExitModel inside a DDP/accelerate wrapper (or the model itself)."""
    while hasattr(model, "module") and not hasattr(model, "exit_layers"):
        model = model.module
    return model


def split_batch(
    inputs: dict[str, Any], labels: torch.Tensor, meta_fraction: float
) -> tuple[dict[str, Any], torch.Tensor, dict[str, Any], torch.Tensor]:
    """(train inputs, train labels, meta inputs, meta labels): the last ``meta_fraction`` of
    the rows (at least one, and at least one left to train on) form the meta batch."""
    b = int(labels.shape[0])
    if b < 2:
        raise InputError("meta-learning recipes need batches of at least 2 rows (train + meta)")
    n_meta = min(b - 1, max(1, int(round(b * meta_fraction))))
    cut = b - n_meta

    def part(sl: slice) -> dict[str, Any]:
        return {
            k: v[sl] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
            for k, v in inputs.items()
        }

    return part(slice(0, cut)), labels[:cut], part(slice(cut, b)), labels[cut:]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything that trains in this stage (one name per tensor)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_sample_losses(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) cross-entropy of every row at every exit, float32."""
    return torch.stack(
        [F.cross_entropy(z.float(), labels, reduction="none") for z in outputs.logits], 1
    )


def functional_forward(
    model: nn.Module, params: dict[str, torch.Tensor], inputs: dict[str, Any]
) -> ExitOutputs:
    """``model(**inputs)`` with ``params`` standing in for its parameters of those names.

    ``params`` must use one name per tensor (``named_parameters()``'s): the model holds some
    modules under two names, and swapping a parameter through both of its paths would make
    ``functional_call`` restore the replacement instead of the original.
    """
    return torch.func.functional_call(model, params, args=(), kwargs=inputs, tie_weights=False)


def lookahead(
    params: dict[str, torch.Tensor], grads: Sequence[torch.Tensor | None], lr: float
) -> dict[str, torch.Tensor]:
    """``theta - lr * g`` per parameter (unchanged where there is no gradient)."""
    return {n: p if g is None else p - lr * g for (n, p), g in zip(params.items(), grads)}


def exit_distribution(num_exits: int, distribution: Sequence[float] | None) -> torch.Tensor:
    """(K,) target share of examples leaving at each exit: given (normalised) or uniform."""
    if distribution is None:
        return torch.full((num_exits,), 1.0 / num_exits)
    q = torch.as_tensor([float(x) for x in distribution], dtype=torch.float32)
    if q.numel() != num_exits or bool((q < 0).any()) or not bool(torch.isfinite(q).all()):
        raise ConfigError(
            f"exit_distribution needs {num_exits} finite non-negative shares; got {distribution}"
        )
    if float(q.sum()) <= 0:
        raise ConfigError("exit_distribution sums to 0")
    return q / q.sum()


def budget_assignment(logits: Sequence[torch.Tensor], shares: torch.Tensor) -> torch.Tensor:
    """(B,) exit index of each row under budgeted-batch inference (MSDNet's dynamic
    evaluation): at exit k, of the rows still running, the ``shares[k] * B`` most confident
    (max softmax) leave; the last exit takes the rest. No gradient flows through this."""
    with torch.no_grad():
        b = int(logits[0].shape[0])
        counts = torch.floor(torch.cumsum(shares, 0) * b + 0.5).long().tolist()
        exit_of = torch.full((b,), len(logits) - 1, dtype=torch.long, device=logits[0].device)
        running = torch.ones(b, dtype=torch.bool, device=logits[0].device)
        taken = 0
        for k, z in enumerate(logits[:-1]):
            n = max(0, counts[k] - taken)
            if n == 0:
                continue
            conf = z.float().softmax(-1).amax(-1).masked_fill(~running, -1.0)
            rows = conf.topk(min(n, int(running.sum()))).indices
            exit_of[rows] = k
            running[rows] = False
            taken += rows.numel()
        return exit_of


def check_meta_options(
    meta_learning_rate: float, meta_fraction: float, inner_learning_rate: float | None
) -> None:
    """Validate the options the meta-learned recipes (l2w, meta_gf) share."""
    if not 0.0 < float(meta_fraction) < 1.0:
        raise ConfigError(f"meta_fraction must be in (0, 1), got {meta_fraction}")
    if not float(meta_learning_rate) > 0:
        raise ConfigError(f"meta_learning_rate must be > 0, got {meta_learning_rate}")
    if inner_learning_rate is not None and not float(inner_learning_rate) > 0:
        raise ConfigError(f"inner_learning_rate must be > 0, got {inner_learning_rate}")

"""Shared pieces of the meta-learning strategies (``l2w``, ``meta_gf``).

Both follow L2W-DEN's training step (``LeapLabTHU/L2W-DEN``, ``tools/main_cifar_DDP.py``
``train``): each batch is cut in two halves; first half 1 is the training half and half 2 the
meta half, then the roles swap, so both halves train the model and both serve as meta data.
For each role: a one-step look-ahead of the model on the training half (``theta' = virtual
optimizer step``, through ``torch.func.functional_call`` so the model's own parameters are
untouched), the meta objective of ``theta'`` on the meta half, and one step of the strategy's
meta-parameters on its gradient. The meta-parameters live in the strategy (not in the model),
with their own Adam optimizer; they are training-time state only.

The virtual step is the real optimizer's step written as a differentiable function, with the
optimizer's state, as the reference's ``MetaSGD.meta_step`` (``tools/meta.py``) loads the SGD
optimizer's momentum buffers: :func:`virtual_step` reproduces ``torch.optim.SGD`` (momentum,
dampening, Nesterov, weight decay), ``Adam`` and ``AdamW`` (moments, bias correction, step
count, decoupled or L2 weight decay) for every parameter group. The Trainer's optimizer is
found by :class:`OptimizerWatch` (a global optimizer-step hook that recognises the optimizer
stepping the model's parameters); until it has stepped once (the first batch) there is no
state to use and the look-ahead is a plain SGD step at the current learning rate, which is
what the reference's ``MetaSGD`` does with empty momentum buffers.

The look-ahead runs on the unwrapped model in this process (single-process training); its
forward passes use copies of the model's buffers, so they never move BatchNorm statistics.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

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


def halves(
    inputs: dict[str, Any], labels: torch.Tensor
) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """The batch cut in two halves (the first gets the odd row), as ``tensor.chunk(2)``:
    ``[(inputs_1, labels_1), (inputs_2, labels_2)]``."""
    b = int(labels.shape[0])
    if b < 2:
        raise InputError(
            "meta-learning strategies need batches of at least 2 rows (two halves); with "
            "dataloader_drop_last=False the last batch of an epoch may be shorter: drop it "
            "(dataloader_drop_last=True, what train() chooses when the setting is not given) "
            "or choose a batch size that leaves no single row")
    cut = (b + 1) // 2

    def part(sl: slice) -> dict[str, Any]:
        return {
            k: v[sl] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b else v
            for k, v in inputs.items()
        }

    return [(part(slice(0, cut)), labels[:cut]), (part(slice(cut, b)), labels[cut:])]


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
    """``model(**inputs)`` with ``params`` standing in for its parameters of those names and
    copies of its buffers (a look-ahead must not update BatchNorm's running statistics).

    ``params`` must use one name per tensor (``named_parameters()``'s): the model holds some
    modules under two names, and swapping a parameter through both of its paths would make
    ``functional_call`` restore the replacement instead of the original.
    """
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return torch.func.functional_call(
        model, {**buffers, **params}, args=(), kwargs=inputs, tie_weights=False
    )


# -- the optimizer's own step, differentiable ------------------------------------------------
_WATCHES: weakref.WeakSet[OptimizerWatch] = weakref.WeakSet()
_HOOK: list[Any] = []  # the one global hook, registered on first use


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for watch in list(_WATCHES):
        watch._observe(optimizer)


class OptimizerWatch:
    """Finds the optimizer that steps ``probe`` (a parameter of the model being trained).

    One global optimizer step hook (``register_optimizer_step_post_hook``, registered once per
    process, a no-op while no watch is alive) shows every optimizer step to the live watches;
    a watch keeps a weak reference to the last optimizer whose parameter groups hold its
    ``probe``.
    """

    def __init__(self) -> None:
        self.probe: torch.Tensor | None = None
        self._found: weakref.ReferenceType | None = None
        if not _HOOK:
            _HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))
        _WATCHES.add(self)

    def _observe(self, optimizer: torch.optim.Optimizer) -> None:
        if self.probe is not None and _holds(optimizer, self.probe):
            self._found = weakref.ref(optimizer)

    def watch(self, params: dict[str, torch.Tensor]) -> torch.optim.Optimizer | None:
        """Start (or keep) watching for the optimizer of ``params``; the one found, if any."""
        first = next(iter(params.values()), None)
        if first is not self.probe:
            self.probe, self._found = first, None
        optimizer = self._found() if self._found is not None else None
        if optimizer is not None and self.probe is not None and not _holds(optimizer, self.probe):
            return None
        return optimizer


def _holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(p is param for g in optimizer.param_groups for p in g["params"])


def _step_count(state: dict[str, Any]) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, torch.Tensor) else step)


def virtual_step(
    params: dict[str, torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    optimizer: torch.optim.Optimizer | None,
    lr: float,
) -> dict[str, torch.Tensor]:
    """``theta'``: one step of ``optimizer`` from ``params`` with ``grads``, differentiable in
    the grads (and the params), the optimizer's state read but not changed.

    params: name -> tensor; grads: one per param (None: unchanged). Without an optimizer, or
    for an optimizer class other than SGD / Adam / AdamW, a plain SGD step ``theta - lr g``.
    The learning rate and hyperparameters are each parameter's group's; ``lr`` is used only
    without an optimizer.
    """
    groups: dict[int, dict[str, Any]] = {}
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                groups[id(p)] = group
    kind = None
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        kind = "adamw" if isinstance(optimizer, torch.optim.AdamW) else "adam"
    elif isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    out: dict[str, torch.Tensor] = {}
    for (name, p), g in zip(params.items(), grads):
        group = groups.get(id(p))
        if g is None:
            out[name] = p
            continue
        if kind is None or group is None:
            out[name] = p - lr * g
            continue
        state = optimizer.state.get(p, {})  # type: ignore[union-attr]
        rate, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
        if group.get("maximize", False):
            g = -g
        if kind == "sgd":
            if wd:
                g = g + wd * p
            momentum = float(group.get("momentum", 0.0))
            buf = state.get("momentum_buffer")
            if momentum and buf is not None:
                b = momentum * buf + (1.0 - float(group.get("dampening", 0.0))) * g
            else:
                b = g
            step_dir = g + momentum * b if group.get("nesterov", False) else b
            out[name] = p - rate * step_dir
            continue
        beta1, beta2 = (float(x) for x in group["betas"])
        eps = float(group["eps"])
        base = p
        if kind == "adam" and wd:
            g = g + wd * p
        elif kind == "adamw" and wd:
            base = p * (1.0 - rate * wd)
        t = _step_count(state) + 1.0
        m = beta1 * state["exp_avg"] + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
        v_prev = state.get("exp_avg_sq")
        v = beta2 * v_prev + (1 - beta2) * g * g if v_prev is not None else (1 - beta2) * g * g
        if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
            v = torch.maximum(v, state["max_exp_avg_sq"])
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        # clamp: sqrt's derivative at 0 is infinite (a parameter with a zero gradient and no
        # history would poison the meta-gradient with 0 * inf)
        denom = (v / bc2).clamp_min(1e-30).sqrt() + eps
        out[name] = base - rate * (m / bc1) / denom
    return out


# -- L2W's target exit distribution and its budgeted assignment ----------------------------------
def geometric_exit_distribution(num_exits: int, ratio: float) -> torch.Tensor:
    """(K,) target share of examples leaving at each exit, ``q_k ∝ ratio^(k+1)`` (the
    reference's ``calc_target_probs``: ``ratio = target_p_index / 20``; 1 = uniform)."""
    if not (math.isfinite(float(ratio)) and float(ratio) > 0):
        raise ConfigError(f"the exit distribution's ratio must be > 0, got {ratio}")
    q = torch.tensor([float(ratio) ** (k + 1) for k in range(num_exits)], dtype=torch.float64)
    return (q / q.sum()).float()


def exit_distribution(num_exits: int, distribution: Sequence[float] | None,
                      ratio: float = 1.0) -> torch.Tensor:
    """(K,) target exit shares: ``distribution`` (normalised) or the geometric one."""
    if distribution is None:
        return geometric_exit_distribution(num_exits, ratio)
    q = torch.as_tensor([float(x) for x in distribution], dtype=torch.float32)
    if q.numel() != num_exits or bool((q < 0).any()) or not bool(torch.isfinite(q).all()):
        raise ConfigError(
            f"exit_distribution needs {num_exits} finite non-negative shares; got {distribution}"
        )
    if float(q.sum()) <= 0:
        raise ConfigError("exit_distribution sums to 0")
    return q / q.sum()


def budget_assignment(logits: Sequence[torch.Tensor], shares: torch.Tensor) -> torch.Tensor:
    """(B,) exit index of each row under budgeted-batch inference, as the reference's meta
    loss assigns it: at exit k < K-1, of the rows not yet assigned, the ``floor(B *
    shares[k])`` most confident (max softmax) leave; the last exit takes the rest. No
    gradient flows through this."""
    with torch.no_grad():
        b = int(logits[0].shape[0])
        exit_of = torch.full((b,), len(logits) - 1, dtype=torch.long, device=logits[0].device)
        free = torch.ones(b, dtype=torch.bool, device=logits[0].device)
        for k, z in enumerate(logits[:-1]):
            n = min(math.floor(b * float(shares[k])), int(free.sum()))
            if n <= 0:
                continue
            conf = z.float().softmax(-1).amax(-1).masked_fill(~free, -1.0)
            rows = conf.topk(n).indices
            exit_of[rows] = k
            free[rows] = False
        return exit_of


def check_meta_options(meta_learning_rate: float, inner_learning_rate: float | None) -> None:
    """Validate the options the meta-learned strategies (l2w, meta_gf) share."""
    if not float(meta_learning_rate) > 0:
        raise ConfigError(f"meta_learning_rate must be > 0, got {meta_learning_rate}")
    if inner_learning_rate is not None and not float(inner_learning_rate) > 0:
        raise ConfigError(f"inner_learning_rate must be > 0, got {inner_learning_rate}")

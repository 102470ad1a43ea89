"""Exit points of a decoder LM and the per-token confidence check the early-exit decoder runs.

An :class:`ExitPoint` is a depth d (blocks run, 1..L-1) with an ``lm`` head and a temperature.
For a plain Hugging Face LM every exit reads the shared final norm + LM head (CALM); for a
:class:`~exitwise.model.MultiExitModel` the trained ``lm`` heads and calibrated temperatures
are used. The last layer is never an exit point: the model's own output closes the stack.

:func:`check_exit` evaluates one exit for the rows still running and asks the policy; the
policy's per-row state (see :mod:`exitwise.policies.calm_base`) carries the generated
position ``t``, the horizon N and, for ``needs_hidden`` policies, the hidden states
(``hidden`` (A, H) at this exit, ``prev_hidden`` (A, H) at the previous one) and
``exit_depth`` (A,) this exit's depth (``calm_saturation``, ``calm_learned``).
Shapes: A rows in the batch, H hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbones.hf_decoder import HFDecoderBackbone
from ..backbones.kernels import rerouted
from ..errors import ConfigError
from ..heads.lm import LMHead
from ..model import MultiExitModel
from ..policies.base import ExitPolicy, PolicyState, get_policy


@dataclass
class ExitPoint:
    depth: int
    head: LMHead
    temperature: float = 1.0


def resolve_exit_points(
    model: Any, backbone: HFDecoderBackbone, exit_layers: list[int] | None
) -> list[ExitPoint]:
    """Exit points shallowest first. ``exit_layers``: depths in 1..L-1 (default: every depth
    for a plain LM, every non-final exit of a MultiExitModel)."""
    last = backbone.num_layers
    if isinstance(model, MultiExitModel):
        available = {d: k for k, d in enumerate(model.exit_layers) if d < last}
    else:
        available = {d: -1 for d in range(1, last)}
    if exit_layers is None:
        depths = sorted(available)
    else:
        if isinstance(exit_layers, int) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in exit_layers
        ):
            raise ConfigError(f"exit_layers must be a list of ints; got {exit_layers!r}")
        depths = sorted(set(exit_layers))
        bad = [d for d in depths if d not in available]
        if bad:
            raise ConfigError(
                f"exit_layers {bad} are not available; choose from {sorted(available)} "
                f"(depths 1..{last - 1}; the last layer always closes the stack)"
            )
    if not depths:
        raise ConfigError("early-exit decoding needs at least one exit below the last layer")
    points = []
    shared = None
    for d in depths:
        k = available[d]
        if k < 0:
            shared = shared or LMHead(backbone.hidden_size, backbone.vocab_size, backbone=backbone)
            points.append(ExitPoint(d, shared.eval()))
            continue
        head = model.heads[k]
        if not isinstance(head, LMHead):
            raise ConfigError(
                f"early-exit decoding needs 'lm' exit heads; exit {d} has "
                f"{type(head).registered_name!r}"
            )
        if head.uses_cache:
            raise ConfigError(
                f"exit {d} has a block adapter (its own KV cache); early-exit decoding supports "
                "position-wise lm heads only (adapter none / norm / mlp)"
            )
        points.append(ExitPoint(d, head, float(model.temperatures[k])))
    return points


def as_policy(policy: ExitPolicy | str | dict | None) -> ExitPolicy:
    """A policy object from an object, a registered name or a ``to_dict`` dict."""
    if policy is None:
        raise ConfigError(
            "strategy='early_exit' needs a policy, e.g. get_policy('calm_softmax', threshold=0.9)"
        )
    if isinstance(policy, str):
        return get_policy(policy)
    if isinstance(policy, dict):
        data = dict(policy)
        return get_policy(data.pop("name"), **data)
    if not isinstance(policy, ExitPolicy):
        raise ConfigError(f"policy must be an ExitPolicy, a name or a dict; got {policy!r}")
    if policy.needs_labels:
        raise ConfigError(f"policy {policy.registered_name!r} needs labels; it cannot decode")
    return policy


def new_token_state(
    policy: ExitPolicy, t: torch.Tensor, horizon: int, embedded: torch.Tensor
) -> PolicyState:
    """Fresh per-row policy state for one token: t (A,) tokens generated so far,
    embedded (A, H) the token embedding (the "previous exit" of the first exit)."""
    a = t.shape[0]
    state = dict(policy.init_state(a, t.device))
    state["t"] = t.float()
    state["horizon"] = torch.full((a,), float(horizon), device=t.device)
    if getattr(policy, "needs_hidden", False):
        state["prev_hidden"] = embedded
    return state


def check_exit(
    policy: ExitPolicy,
    point: ExitPoint,
    exit_index: int,
    num_exits: int,
    hidden: torch.Tensor,
    live: torch.Tensor,
    state: PolicyState,
) -> tuple[torch.Tensor, torch.Tensor, PolicyState]:
    """Evaluate exit ``point`` on the rows with ``live`` (A,) True.

    hidden: (A, H) states after ``point.depth`` blocks. Returns (exits (A,) bool, tokens (A,)
    the head's argmax (valid where ``exits``), state with the live rows updated).
    """
    idx = live.nonzero()[:, 0]
    exits = torch.zeros_like(live)
    tokens = torch.zeros(live.shape[0], dtype=torch.long, device=live.device)
    if idx.numel() == 0:
        return exits, tokens, state
    sub = policy.keep(state, idx)
    if getattr(policy, "needs_hidden", False):
        sub["hidden"] = hidden.index_select(0, idx)
        # Which exit this is, as a depth (a learned per-exit classifier is keyed by depth).
        sub["exit_depth"] = torch.full((idx.numel(),), point.depth, device=live.device)
    # Over the head's draft vocabulary when it has one (K finite logits: the softmax over them
    # equals the one over V with -inf outside, and K << V is cheaper).
    head = point.head
    compact = getattr(head, "compact_logits", None)
    if compact is not None:
        logits = compact(hidden.index_select(0, idx)[:, None])[:, 0]
    else:
        rows = hidden.index_select(0, idx)[:, None]
        with rerouted(rows):  # few-row kernels where this row count pays
            logits = head.token_logits(rows)[:, 0]
    logits = logits / point.temperature
    decided, sub = policy.decide(exit_index, num_exits, logits, sub)
    exits[idx] = decided.to(exits.device)
    tokens[idx] = head.compact_argmax(logits) if compact is not None else logits.argmax(-1)
    state = dict(state)
    for key, value in sub.items():
        if key in state and state[key].shape[1:] == value.shape[1:]:
            full = state[key].clone()
            full[idx] = value.to(full.dtype)
            state[key] = full
    return exits, tokens, state

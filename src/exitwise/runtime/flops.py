"""Per-row cost of leaving at each exit, from the backbone's and heads' FLOP counts.

A row's cost depends only on its own real tokens, never on which other rows share its batch,
so the executor and the offline replay use the same table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..backbones.base import BackboneState

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def head_mask(backbone: Any, layer: int, state: BackboneState,
              mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask a head's FLOPs after ``layer`` are counted with: the features' own mask where
    the backbone reports no other shape there; all ones over the positions it reports (a
    CNN's H x W map: a head that works per position pays for each); None for one vector per
    row (a ViT's pooled output after its last block, although its tokens had a mask)."""
    n = backbone.feature_positions(layer, state)
    if n is None or (mask is not None and mask.dim() == 2 and n == mask.shape[1]):
        return mask
    return None if n <= 1 else torch.ones(state.batch_size, n, dtype=torch.long)


def exit_cost_table(model: "MultiExitModel", state: BackboneState,
                    ran: torch.Tensor | None = None) -> torch.Tensor:
    """(B, num_exits) float64: FLOPs a row spends if it leaves at exit k.

    Counts the embedding/stem, every block up to the exit's depth, and every head evaluated on
    the way (a row leaving at exit k ran heads 0..k), with the exit scorer's work when the
    model has one (policies that do not read it skip it at run time: a slight overcount). ``state`` is the state right after
    ``start`` (its mask gives each row's real length). A model with a skip gate also pays its
    gate in front of every block, and ``ran`` (B, num_layers) bool says which blocks each row
    ran (None: all of them).
    """
    backbone = model.backbone
    b = state.batch_size
    cumulative = backbone.start_flops(state).clone()
    heads_so_far = torch.zeros(b, dtype=torch.float64)
    columns = []
    exit_iter = iter(zip(model.exit_layers, model.heads))
    depth, head = next(exit_iter)
    mask = None if state.mask is None else state.mask.cpu()
    for i in range(backbone.num_layers):
        block = backbone.layer_flops(i, state).cpu()
        cumulative = cumulative + (block if ran is None else block * ran[:, i].cpu())
        if model.gate is not None:
            cumulative = cumulative + model.gate.gate_flops(i, mask, b)
        if i + 1 == depth:
            heads_so_far = heads_so_far + head.head_flops(
                head_mask(backbone, depth, state, mask), b)
            if model.scorer is not None:  # a learned exit score is computed at every exit
                heads_so_far = heads_so_far + model.scorer.scorer_flops(len(columns), b)
            columns.append(cumulative + heads_so_far)
            nxt = next(exit_iter, None)
            if nxt is None:
                break
            depth, head = nxt
    return torch.stack(columns, dim=1)


def full_depth_cost(model: "MultiExitModel", state: BackboneState) -> torch.Tensor:
    """(B,) FLOPs of the plain model: every block and only the final classifier."""
    backbone = model.backbone
    cost = backbone.start_flops(state).clone()
    for i in range(backbone.num_layers):
        cost = cost + backbone.layer_flops(i, state).cpu()
    mask = None if state.mask is None else state.mask.cpu()
    final = head_mask(backbone, backbone.num_layers, state, mask)
    return cost + model.heads[-1].head_flops(final, state.batch_size)


def padded(state: BackboneState) -> BackboneState:
    """A view of ``state`` whose mask marks every position real: what the hardware computes
    on a padded batch (used for ``EarlyExitResult.executed_flops``)."""
    mask = None if state.mask is None else torch.ones_like(state.mask)
    return BackboneState(hidden=state.hidden, mask=mask)

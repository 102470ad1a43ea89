"""``smartbert``: SmartBERT's two training stages (Hu et al., IJCAI 2023, "SmartBERT: A
Promotion of Dynamic Early Exiting Mechanism for Accelerating BERT Inference", sec. 3.2-3.4).

Reference: HuBoren99/SmartBert, ``SmartBert.forward`` in ``models/SmartBert.py`` (branches
``train_first_stage`` and the second stage) and ``train`` / ``init_model`` in ``main.py``.
The model gets the ``smartbert`` skip gate (:mod:`exitwise.heads.smartbert`): before block i,
gate i reads the block's input h_i and gives g_i, the probability that the row skips it.

- stage 1 (``stage-1``): the backbone, the gates (and their stage-1 projections) and the final
  exit train. Every block runs on every row and its output is mixed with its input by the
  gate, ``h_{i+1} = (1 - w_i) * block_i(h_i) + w_i * h_i``; with the *hard weight mechanism*
  ``w_i = g_i + (1[g_i >= threshold] - g_i).detach()`` (the forward value is the inference
  decision, 0 or 1, the gradient reaches g_i straight through), without it ``w_i = g_i``. The
  loss is ``(1 - eta1) * (CE(final exit) + lam / sum_i mean_rows(g_i)) + eta1 * L_c1``: the
  second term rewards skipping (soft g_i, before hardening); ``L_c1`` is the cross-layer
  contrastive loss between consecutive blocks' inputs, ``sum_{i=0}^{L-2} C(P_i(h_i),
  P_{i+1}(h_{i+1}); t1, positive in the denominator)``, with per-block projections P_i (the
  reference's ``SmartBert.contrast``).
  The reference's "special training mode" mixes with the soft weights for the first three of
  its five stage-1 epochs and hardens them after: here the first ``soft_fraction`` (0.6) of
  the stage's steps are soft.
- stage 2 (``stage-2``): backbone, gates and final exit frozen and run without gradients with
  hard weights; each internal exit k (at depth d) trains on the *output of its own block*
  ``block_{d-1}(h_{d-1})`` (what it reads at inference, where it is only offered to the rows
  that ran that block). Loss: ``(1 - eta2) * sum_k CE_k + eta2 * mean_k C(Q_k(s_k),
  Q_{k+1}(s_{k+1}); t2, positive left out of the denominator)`` over consecutive internal
  exits, where s_k are exit k's token states (``tanh(proj(hidden))``) and Q_k its projection
  (the reference's ``Classifier.main``).

The projections (each linear -> LayerNorm -> tanh -> linear, width 128 for P_i, the head's
width for Q_k) are training-only: they live on the model as ``model.smartbert_projections``
while it trains (in the stage checkpoints, not in ``save_pretrained``'s heads; inference never
runs them).

``C(a, b; t)`` is a token-level InfoNCE: with a, b L2-normalised per token and
``s_ij = a_i . b_j / t`` between the tokens of one sequence, token i's loss is
``log sum_j exp(s_ij) - s_ii``: the same token one layer up is the positive, the other tokens
of the sequence are the negatives (:func:`token_contrastive_loss`).

Exit with the ``entropy`` policy (the reference's rule on the raw entropy); a row whose gate
skips a block is not offered that block's exit (the executor and the replay mask it, see
:mod:`exitwise.heads.skip_gate`).

Defaults follow the reference's ``main.py``: lam 0.05, eta1 0.1, eta2 0.5, t1 0.5, t2 0.55,
skip threshold 0.5, hard weights with the special mode (README's RTE run: lam 0.04, eta1 0.01,
eta2 0.05).

Deviations: padding tokens are neither anchors nor negatives of the contrastive losses (the
reference pads every batch to 128 and counts them all; with dynamic padding that would make
the loss depend on the batch); an anchor without a negative (a one-token row, stage 2) is left
out. The reference's stage-2 loop leaves out the last pair of internal exits while dividing by
the number of pairs (``range(L - 3)`` pairs over ``L - 2``); here every consecutive pair enters
the mean. The reference keeps stage 1's best epoch on the dev set; here the training loop's
own options decide (``load_best_model_at_end``). Both stages use the run's learning rate and
length unless ``stage_args`` say otherwise (reference: 5 and 4 epochs at one rate). The eval
loss the Trainer reports is the task part only (stage 1: the final exit's cross-entropy,
stage 2: the sum over internal exits), from the gated ``forward``. At inference the
``entropy`` policy exits at entropy <= threshold (reference: <), and a skipped block's exit
head still runs on the skipping rows (its answer is ignored for them; the reference runs
nothing there) so that the policy sees the whole batch at every exit: a stateful policy
(patience) counts those answers, and the FLOPs include them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..heads import uses_past_states, uses_previous_logits
from ..options import flag
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    exit_cross_entropy,
    head_parameters,
    register_strategy,
)
from .meta import unwrap

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

PROJECTIONS = "smartbert_projections"


# -- the rules, as pure functions ------------------------------------------------------------
def hard_weight(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The hard weight mechanism: forward value ``1[probs >= threshold]`` (what inference
    decides), gradient passed straight through to ``probs``. (B,) -> (B,)."""
    hard = (probs >= threshold).to(probs.dtype)
    return probs + (hard - probs).detach()


def mix(block_output: torch.Tensor, block_input: torch.Tensor, weight: torch.Tensor
        ) -> torch.Tensor:
    """``(1 - w) * block_output + w * block_input`` with one weight per row: (B, ...) states,
    (B,) weights (1 = the row skips the block)."""
    w = weight.view(-1, *([1] * (block_output.dim() - 1))).to(block_output.dtype)
    return block_output * (1 - w) + block_input * w


def skip_reward(probs: list[torch.Tensor], lam: float) -> torch.Tensor:
    """``lam / sum_i mean_rows(g_i)`` over the gates' (B,) skip probabilities: smaller the
    more the gates skip."""
    return lam / torch.stack([p.float().mean() for p in probs]).sum()


def token_contrastive_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None,
                           temperature: float, include_positive: bool = True) -> torch.Tensor:
    """Token-level InfoNCE between two layers' projected token states, mean over anchors.

    a, b: (B, T, D); mask: (B, T), 1 for real tokens (None: all real). With a and b
    normalised per token and ``s_ij = a_i . b_j / temperature`` within one sequence, token i's
    loss is ``log sum_j exp(s_ij) - s_ii`` over real tokens j (``include_positive``; else j != i).
    Padding tokens are neither anchors nor negatives; anchors with no candidate are left out.
    """
    qa = F.normalize(a.float(), dim=-1)
    qb = F.normalize(b.float(), dim=-1)
    sim = qa @ qb.transpose(-1, -2) / float(temperature)  # (B, T, T): anchor i, candidate j
    positive = sim.diagonal(dim1=-2, dim2=-1)  # (B, T)
    real = (torch.ones(sim.shape[:2], dtype=torch.bool, device=sim.device) if mask is None
            else mask.bool())
    candidates = real[:, None, :].expand_as(sim)
    if not include_positive:
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        candidates = candidates & ~eye
    anchors = real & candidates.any(-1)
    if not bool(anchors.any()):
        return sim.sum() * 0.0
    denominator = torch.logsumexp(sim.masked_fill(~candidates, float("-inf")), dim=-1)
    return (denominator - positive)[anchors].mean()


# -- the training-only projections -------------------------------------------------------------
def contrast_projection(in_width: int, width: int) -> nn.Sequential:
    """SmartBERT's contrastive projection: linear -> LayerNorm -> tanh -> linear."""
    return nn.Sequential(nn.Linear(in_width, width), nn.LayerNorm(width), nn.Tanh(),
                         nn.Linear(width, width))


class Projections(nn.Module):
    """``layers[i]``: P_i on block i's input (stage 1); ``exits[k]``: Q_k on internal exit k's
    token states (stage 2)."""

    def __init__(self, layer_dims: list[int], width: int, exit_widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(contrast_projection(d, width) for d in layer_dims)
        self.exits = nn.ModuleList(contrast_projection(w, w) for w in exit_widths)


def attach_projections(model: MultiExitModel, exit_widths: list[int], width: int = 128
                       ) -> Projections:
    """The model's training-only projections, created on first use (a submodule, so the
    Trainer's optimizer and the stage checkpoints see it)."""
    found = getattr(model, PROJECTIONS, None)
    if found is not None:
        return found
    gate = model.gate
    assert gate is not None
    projections = Projections(gate.input_dims, width, exit_widths)
    model.add_module(PROJECTIONS, projections.to(model.temperatures.device))
    return projections


# -- the gated pass of training ----------------------------------------------------------------
@dataclass
class GatedRun:
    """One training pass through the gated blocks (every block runs on every row).

    inputs:  per block i, what it read (the head-side view ``backbone.features``), (B, T, H).
    outputs: per block i, its own output ``block_i(h_i)`` before mixing, (B, T, H).
    probs:   per block i, gate i's (B,) skip probability (soft).
    final:   the state after the last block, mixed, (B, T, H); mask: (B, T) or None.
    """

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    probs: list[torch.Tensor]
    final: torch.Tensor
    mask: torch.Tensor | None


def gated_run(model: MultiExitModel, inputs: dict[str, Any], hard: bool) -> GatedRun:
    """Run every block on every row, mixing each block's output with its input by its gate
    (hard weights or soft probabilities), as the reference's training forward."""
    backbone, gate = model.backbone, model.gate
    assert gate is not None
    state = backbone.start(**inputs)
    run = GatedRun([], [], [], state.hidden, state.mask)
    for i in range(model.exit_layers[-1]):
        block_input = state.hidden
        seen, mask = backbone.features(state)
        probs = gate(i, seen, mask)
        state = backbone.step(i, state)
        out, _ = backbone.features(state)
        run.inputs.append(seen)
        run.outputs.append(out)
        run.probs.append(probs)
        weight = hard_weight(probs, gate.threshold) if hard else probs
        state.hidden = mix(state.hidden, block_input, weight)
    run.final, run.mask = backbone.features(state)
    return run


# -- the two stages --------------------------------------------------------------------------
class FirstStage:
    """Stage 1's step: the final exit's cross-entropy, the skip reward and the cross-layer
    contrastive loss between block inputs (see the module docstring)."""

    def __init__(self, strategy: SmartBERTStrategy, progress: TrainingProgress) -> None:
        self.s, self.progress = strategy, progress

    def hard_now(self) -> bool:
        if not self.s.hard_weight:
            return False
        fraction = self.progress.fraction
        return fraction is None or fraction >= self.s.soft_fraction

    def __call__(self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
                 ) -> tuple[torch.Tensor, ExitOutputs | None]:
        core = unwrap(model)
        run = gated_run(core, inputs, self.hard_now())
        final = core.num_exits - 1
        ce = F.cross_entropy(core.head_logits(final, run.final, run.mask).float(), labels)
        task = ce + skip_reward(run.probs, self.s.lam) if self.s.lam else ce
        if self.s.eta1 == 0.0:
            return task, None
        project = getattr(core, PROJECTIONS).layers
        states = [project[i](h) for i, h in enumerate(run.inputs)]
        mask = run.mask if states[0].dim() == 3 else None
        contrast = sum((token_contrastive_loss(_tokens(a), _tokens(b), mask, self.s.t1, True)
                        for a, b in pairwise(states)), start=ce.new_zeros(()))
        return (1 - self.s.eta1) * task + self.s.eta1 * contrast, None


class SecondStage:
    """Stage 2's step: the internal exits' cross-entropies on their blocks' outputs (frozen,
    hard-gated backbone) and the cross-layer contrastive loss between consecutive exits."""

    def __init__(self, strategy: SmartBERTStrategy) -> None:
        self.s = strategy

    def __call__(self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
                 ) -> tuple[torch.Tensor, ExitOutputs | None]:
        core = unwrap(model)
        with torch.no_grad():
            run = gated_run(core, inputs, hard=True)
        ce_terms, states = [], []
        project = getattr(core, PROJECTIONS).exits
        for k, depth in enumerate(core.exit_layers[:-1]):
            hidden = run.outputs[depth - 1]
            ce_terms.append(F.cross_entropy(core.heads[k](hidden, run.mask).float(), labels))
            if self.s.eta2 > 0.0:
                tokens, mask = core.heads[k].token_states(hidden, run.mask)
                states.append((project[k](tokens), mask))
        ce = torch.stack(ce_terms).sum()
        if len(states) < 2:
            return (1 - self.s.eta2) * ce if states else ce, None
        pairs = [token_contrastive_loss(a, b, mask, self.s.t2, include_positive=False)
                 for (a, mask), (b, _) in pairwise(states)]
        return (1 - self.s.eta2) * ce + self.s.eta2 * torch.stack(pairs).mean(), None


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) passes through; (B, D) becomes one token (B, 1, D)."""
    return x if x.dim() == 3 else x.reshape(x.shape[0], 1, -1)


def final_exit_ce(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    """Stage 1's eval loss: the final exit's cross-entropy."""
    return exit_cross_entropy(outputs, labels, len(outputs.logits) - 1)


def internal_exits_ce(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
    """Stage 2's eval loss: the internal exits' cross-entropies, summed."""
    return torch.stack([exit_cross_entropy(outputs, labels, k)
                        for k in range(len(outputs.logits) - 1)]).sum()


@register_strategy("smartbert")
class SmartBERTStrategy(TrainingStrategy):
    """Options (reference names in brackets): ``lam`` [lamada] weight of the skip reward;
    ``eta1`` / ``eta2`` weights of the contrastive losses of stage 1 / 2; ``t1`` / ``t2`` their
    temperatures; ``skip_threshold`` [skipped_rate] the gates' threshold (training's hard
    weights and inference); ``hard_weight`` [is_hard_weight] harden the gates in stage 1;
    ``soft_fraction`` share of stage 1's steps mixed with soft weights first (the special
    training mode; 0 turns it off)."""

    tunes_backbone = True
    tasks = ("classification",)  # cross-entropy exits and an entropy exit rule

    def __init__(self, lam: float = 0.05, eta1: float = 0.1, eta2: float = 0.5,
                 t1: float = 0.5, t2: float = 0.55, skip_threshold: float = 0.5,
                 hard_weight: bool = True, soft_fraction: float = 0.6,
                 stage_args: Any = None) -> None:
        super().__init__(stage_args)
        for name, value in (("eta1", eta1), ("eta2", eta2), ("soft_fraction", soft_fraction)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"smartbert: {name} must be in [0, 1], got {value}")
        for name, value in (("t1", t1), ("t2", t2), ("skip_threshold", skip_threshold)):
            if not float(value) > 0.0:
                raise ConfigError(f"smartbert: {name} must be > 0, got {value}")
        if not float(lam) >= 0.0:
            raise ConfigError(f"smartbert: lam must be >= 0, got {lam}")
        self.lam, self.eta1, self.eta2 = float(lam), float(eta1), float(eta2)
        self.t1, self.t2 = float(t1), float(t2)
        self.skip_threshold = float(skip_threshold)
        self.hard_weight = flag("smartbert", "hard_weight", hard_weight)
        self.soft_fraction = float(soft_fraction)

    def options(self) -> dict[str, Any]:
        return {"lam": self.lam, "eta1": self.eta1, "eta2": self.eta2, "t1": self.t1,
                "t2": self.t2, "skip_threshold": self.skip_threshold,
                "hard_weight": self.hard_weight, "soft_fraction": self.soft_fraction,
                **super().options()}

    def _check(self, model: MultiExitModel) -> None:
        if model.num_exits < 2:
            raise ConfigError("smartbert needs at least one exit besides the final one")
        for k, head in enumerate(model.heads):
            if uses_previous_logits(head) or uses_past_states(head):
                raise ConfigError(
                    f"smartbert trains each exit on its own block's output; exit {k}'s "
                    f"{type(head).registered_name!r} head reads earlier exits")
        if self.eta2 > 0.0:
            missing = [k for k, h in enumerate(model.heads[:-1]) if not hasattr(h, "token_states")]
            if missing:
                raise ConfigError(
                    "smartbert's second-stage contrastive loss reads the exits' token states: "
                    f"exits {missing} need the 'smartbert' head (head='smartbert'), or set eta2=0")

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        self._check(model)
        gate = model.attach_gate("smartbert", threshold=self.skip_threshold,
                                 dropout=model.config.dropout)
        gate.threshold = self.skip_threshold  # also when the model already had the gate
        widths = [h.width for h in model.heads[:-1]] if self.eta2 > 0.0 else []
        attach_projections(model, widths)
        final = model.num_exits - 1
        progress = TrainingProgress()

        def projections(m: MultiExitModel, part: str) -> list[nn.Parameter]:
            return list(getattr(getattr(m, PROJECTIONS), part).parameters())

        return [
            Stage(name="stage-1",
                  trainable=lambda m: (backbone_parameters(m) + head_parameters(m, [final])
                                       + list(m.gate.parameters()) + projections(m, "layers")),
                  loss=final_exit_ce, step=FirstStage(self, progress), progress=progress),
            Stage(name="stage-2",
                  trainable=lambda m: head_parameters(m, range(final)) + projections(m, "exits"),
                  loss=internal_exits_ce, step=SecondStage(self)),
        ]

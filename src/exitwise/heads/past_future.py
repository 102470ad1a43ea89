"""``past_future``: the exit of the Global Past-Future method (Liao et al., "A Global
Past-Future Early Exit Method for Accelerating Inference of Pre-trained Language Models",
NAACL 2021, the method section).

An exit that reads more than its own layer: (a) the pooled states of all *past* exits, (b) its
own pooled state, and (c) *imitated future* states, one per exit after it, predicted from its
own state by small learned projections (trained by the ``past_future`` strategy to imitate the
real later exits' states), so that the prediction draws on the whole depth of the network
without running the deeper layers.

Reference: ``lancopku/Early-Exit``, ``model/modeling_bert.py``: ``BertModel.forward`` (one
``BertPooler`` per layer, the states of the earlier layers detached, ``CLSPredLayer`` for the
imitation) and ``ClassifierWithGate`` (the combination). With exit ``k`` of ``E`` (0-based),
every state ``s_j`` (D,) of position ``j`` (real for ``j <= k``, imitated for ``j > k``) is
projected by its own affine map to ``2C`` numbers, ``[a_j; g_j] = W_j s_j + b_j``; then

- past logits ``P = sum_{j<=k} a_j``, future logits ``F = sum_{j>k} a_j`` (zero at the last
  exit),
- the gate ``lambda = sigmoid(G tanh(mean_{j<=k} g_j))`` (C,), with ``G`` a C x C linear layer,
- logits ``= 2 lambda * P + (2 - 2 lambda) * F``.

The pooled state is ``s_k = tanh(A pool(h) + a)`` (the reference's per-layer pooler) and the
imitated state of exit ``j > k`` is ``tanh(M_j s_k + m_j)`` (the reference's ``CLSPredLayer``).
The paper's full text was not at hand here; this follows the authors' code. A later
re-implementation (``bartwojcik/D2DMoE``, ``architectures/early_exits/gpf.py``,
``GPF.get_merged_layer_state``) notes that this combination differs from the paper's
description and also follows the code.

The mechanism in exitwise: this head declares ``uses_past_states``; the model, the runtime
executor and the logits cache hand exit k ``past`` = the (B, D) states ``s_0 .. s_{k-1}`` that
the earlier past-future exits left (rows that left the batch are dropped from them) and collect
its own state (:meth:`exit_state`) for the exits after it. The model sets ``exit_index`` and
``num_exits`` for every such head from its exit layout, so a head owns exactly
``num_exits - 1 - exit_index`` imitators and ``num_exits`` projections; built on its own
(defaults ``exit_index=0, num_exits=1``) it is a single exit with no past and no future.
``return_features=True`` reports ``s_k`` as the exit's feature (the input of ``feature_layer``,
an identity tap), which the strategy uses as the imitation target of the earlier exits.

Deviations from the reference: ``pool`` is the mean over the real tokens by default
(``pooling="mean"``); the reference pools the [CLS] token (``pooling="first"``). In the lower
layers of a checkpoint that was not pre-trained to put the sentence into [CLS] (a
sentence-transformers model pooled by the mean, as the embedded default MiniLM), the [CLS] state
barely varies across inputs, and a short fine-tune left the first exits predicting one class for
every input (``benchmarks/nlp_methods.py``, past_future rows before this default); the mean of
the tokens does not depend on what the checkpoint put into [CLS]. The reference shares one
projection ``W_j`` per position, one imitator per target layer and one gate across all exits;
here each exit owns its own (heads are independent modules, saved and loaded per exit). Exits
may sit at any subset of layers (the reference has one at every layer): past and future are the
other *exits*, not layers. The dropout every exitwise head takes plays the reference's
``output_dropout`` over all states before the projections. Weights start as the reference's
(normal, std 0.02; biases zero). As in the reference, the past states are detached (the
reference detaches each layer's state once the next layer runs; ``detach_past=False`` lets
gradients flow into the earlier exits).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..options import flag
from .base import POOLINGS, ExitHead, register_head

INIT_STD = 0.02  # BERT's initializer_range, with which the reference initialises every layer


class _StateTap(nn.Identity):
    """Identity whose input is the exit's pooled state: the "feature" that
    ``return_features`` and exit scorers read (``in_features`` = its width)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_features = width


@register_head("past_future")
class PastFutureHead(ExitHead):
    uses_past_states = True

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.1,
        exit_index: int = 0,
        num_exits: int = 1,
        detach_past: bool = True,
        pooling: str = "mean",
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        if pooling not in POOLINGS:
            raise ConfigError(f"past_future: pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        for name, value in (("exit_index", exit_index), ("num_exits", num_exits)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if not 0 <= exit_index < num_exits:
            raise ConfigError(
                f"exit_index must be in [0, num_exits); got exit_index={exit_index}, "
                f"num_exits={num_exits}"
            )
        self.exit_index, self.num_exits = exit_index, num_exits
        self.detach_past = flag("past_future head", "detach_past", detach_past)
        d, c = in_features, num_labels
        self.dense = nn.Linear(d, d)  # the per-exit pooler: s_k = tanh(dense(pool(h)))
        self.feature_layer = _StateTap(d)
        # imitators[i] predicts the state of exit exit_index + 1 + i from s_k
        self.imitators = nn.ModuleList(nn.Linear(d, d) for _ in range(self.num_future))
        # one affine map per position j = 0..E-1 to [logit part (C); gate part (C)]
        self.weight = nn.Parameter(torch.empty(num_exits, d, 2 * c))
        self.bias = nn.Parameter(torch.zeros(num_exits, 2 * c))
        self.gate = nn.Linear(c, c)
        for lin in [self.dense, self.gate, *self.imitators]:
            nn.init.normal_(lin.weight, std=INIT_STD)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.weight, std=INIT_STD)

    @property
    def num_future(self) -> int:
        """Exits after this one (= imitated states)."""
        return self.num_exits - 1 - self.exit_index

    def exit_state(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """This exit's pooled state s_k (B, D) = tanh(dense(pool(hidden))), left to the later
        exits; pool: the mean of the real tokens, or [CLS] with ``pooling="first"``."""
        pooled = (self.first_token(hidden) if self.pooling == "first"
                  else self.token_mean(hidden, mask))
        return torch.tanh(self.dense(pooled))

    def imitate(self, state: torch.Tensor) -> torch.Tensor:
        """Imitated states of the later exits from s_k (B, D): (B, num_future, D)."""
        if not self.imitators:
            return state.new_zeros(state.shape[0], 0, state.shape[-1])
        return torch.stack([torch.tanh(m(state)) for m in self.imitators], dim=1)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        past: list[torch.Tensor] | None = None,
        state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B, T, D) / (B, D) / feature maps; past: the states (B, D) of exits
        0..exit_index-1 (None = none, only valid at the first exit); state: this exit's own
        :meth:`exit_state` when the caller already has it. Returns (B, C) logits."""
        own = self.exit_state(hidden, mask) if state is None else state
        own = self.feature_layer(own)
        past = list(past or [])
        if len(past) != self.exit_index:
            raise InputError(
                f"this past_future exit (index {self.exit_index}) reads the states of the "
                f"{self.exit_index} exits before it, got {len(past)}: every earlier exit must "
                "be a past_future head, and the model (forward, early_exit, the logits cache) "
                "passes them"
            )
        for p in past:
            if p.shape != own.shape:
                raise InputError(f"a past state has shape {tuple(p.shape)}, this exit's state "
                                 f"is {tuple(own.shape)}")
        if self.detach_past:
            past = [p.detach() for p in past]
        states = torch.cat(
            [torch.stack(past + [own], dim=1), self.imitate(own)], dim=1
        )  # (B, E, D): past, own, imitated future
        proj = torch.einsum("bed,edo->beo", self.dropout(states), self.weight) + self.bias
        return self.combine(proj)

    def combine(self, proj: torch.Tensor) -> torch.Tensor:
        """(B, E, 2C) per-position projections -> (B, C) logits (the reference's
        ``ClassifierWithGate``): ``2 lambda P + (2 - 2 lambda) F``."""
        c, now = self.num_labels, self.exit_index + 1
        past_logits = proj[:, :now, :c].sum(1)
        future_logits = proj[:, now:, :c].sum(1)  # zeros at the last exit
        lam = torch.sigmoid(self.gate(torch.tanh(proj[:, :now, c:].mean(1))))
        return 2 * lam * past_logits + (2 - 2 * lam) * future_logits

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """The token mean (n x D adds; none for [CLS]), the pooler, the imitators, E
        per-position projections, the gate layer and the element-wise combination (sums,
        mean, gate, mix: about 8 per class)."""
        d, c = float(self.in_features), float(self.num_labels)
        flops = (self.linear_flops(self.dense, self.gate, *self.imitators)
                 + self.num_exits * 2 * d * 2 * c + 8 * c)
        out = torch.full((batch_size,), flops, dtype=torch.float64)
        if self.pooling == "mean" and mask is not None:
            out += mask.sum(1).to(torch.float64) * d
        return out

"""``lm``: a language-model exit through the backbone's own final norm and LM head.

As in LayerSkip and CALM, an intermediate hidden state is read by the *shared* final norm and
*shared* LM head of the decoder (:class:`~exitwise.backbones.HFDecoderBackbone`), so an exit
costs no new parameters. Optional trainable pieces:

- ``adapter="norm"``:  an own copy of the final norm (a trainable exit norm);
- ``adapter="mlp"``:   a residual MLP ``h + W2 gelu(W1 h)`` before the norm (W2 starts at
  zero, so the exit starts exactly as the shared one);
- ``adapter="block"``: one copy of the backbone's last decoder block (EE-Tuning);
  in generation it keeps its own keys/values in cache layer ``num_layers``;
- ``adapter="kangaroo"``: Kangaroo's adapter (Liu et al. 2024; reference
  ``kangaroo/adapter.py``, ``AdapterModel`` with one ``LlamaDecoderLayer`` that holds only
  ``input_layernorm`` + ``self_attn``, then its own ``norm``, read out by the base model's
  ``lm_head``): one attention sub-layer with its input norm and residual, no feed-forward, then
  an own copy of the final norm before the shared LM head. It is built from a copy of the last
  decoder block whose feed-forward (``block.mlp``) is replaced by a map to zero, so the block's
  own forward (and thus every supported family) computes ``h + attn(norm_1(h))`` exactly. Like
  ``block`` it keeps its own keys/values in cache layer ``num_layers`` during generation.
  As in the reference (``train.py`` builds ``AdapterModel(config)`` fresh), the adapter starts
  new: the copy's weights and its own norm are re-initialized, norms at identity. A warm start
  from the last block's attention (this module's first version) tuned to far worse drafts
  from a shallow exit in a measurement here (docs/benchmarks/lm_speed.md, "Draft heads that
  attend over the context"). Deviations: the reference's adapter is a plain ``nn.Module``, so
  its projections get PyTorch's default ``nn.Linear`` draw (uniform, std 1/sqrt(3 H)); here
  the model's own ``_init_weights`` draws them (normal(0, ``initializer_range``), a similar
  scale), because it covers every family (GPT-2's ``Conv1D``, Gemma's ``1 + w`` norms). The
  reference trains against the full model's distribution (soft cross-entropy); here the
  objective is the caller's (e.g. the model's own answers). A norm that only fed the removed
  feed-forward (Llama's ``post_attention_layernorm``, GPT-2's ``ln_2``) stays in the copy but
  no longer affects the output (it gets no gradient);
- ``untied=True``:     an own copy of the LM head.
- ``conditioned=True``: a *feature-conditioned* draft exit (the idea of EAGLE and Medusa,
  brought to early exit): the exit also reads the full model's final hidden state g at the
  previous position, which verification has just computed for free, as
  ``h + fuse(final_norm(g))`` before the adapter (``fuse`` a Linear(H, H) starting at zero,
  so the exit starts exactly as an unconditioned one). The shallow state h of the new token
  knows the token; g knows what all L blocks made of the context before it. Trained on the
  model's own answers (:mod:`exitwise.lm.objectives.answers`) with the condition dropped
  (zeroed) for a share of the positions, so the head also drafts without one: deeper drafts
  (x2, x3, ...) and early-exit decoding have no final state of the previous position yet, and
  pass none. No condition means exactly what a dropped one meant in training: a zero state,
  so ``h + fuse(final_norm(0))`` (the fuse's bias, plus the norm's bias where it has one);
  the head drafts the same function it was trained as. Deviation from EAGLE: no
  feature-level autoregression (EAGLE predicts the next final feature and chains on it);
  only the first draft of a step is conditioned. Only the ``none``, ``norm`` and ``mlp``
  adapters take the condition: attention adapters given it, and an attention sub-layer
  after the conditioned MLP (EAGLE's idea of attending over the context), drafted no
  better in a measurement here (docs/benchmarks/lm_speed.md, "Draft heads that attend over
  the context"), so the cache bookkeeping they would need in decoding is not built.

``draft_vocab=K`` restricts the exit's read-out to K token ids (a persistent ``vocab_ids``
buffer, chosen from data by :func:`exitwise.lm.draft_vocab.choose_draft_vocab`): the
exit multiplies by K rows of the LM head instead of all V. At batch 1 the LM head streams as
many bytes as ~6 of SmolLM2's 30 blocks, so a draft token through the full head costs far more
than through K = V/6 rows (FR-Spec's frequency-ranked drafting). Self-speculative decoding
stays lossless: only the draft is restricted, the full model verifies over the whole vocabulary.
Logits outside the subset are ``-inf`` in :meth:`token_logits`; :meth:`compact_logits` gives
the (..., K) logits themselves (for training and fast drafting).

Shared modules are referenced, not registered, so ``state_dict`` (what
``MultiExitModel.save_pretrained`` writes) holds only the trainable pieces.

Before :meth:`init_from_backbone` binds it, a head stands alone with its own LayerNorm and a
(num_labels x in_features) output layer, so the head contract holds for it too.

Shapes: ``forward(hidden (B, T, H), mask (B, T)) -> (B, V)`` next-token logits at each row's
last real token (left or right padding); ``token_logits(hidden (B, q, H)) -> (B, q, V)``;
``condition``: (B, q, H) final hidden states of the previous positions, or None.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..backbones.hf_decoder import DecodeContext, prompt_positions
from ..errors import ConfigError
from ..options import flag
from .base import ExitHead, register_head

ADAPTERS = ("none", "norm", "mlp", "block", "kangaroo")
BLOCK_ADAPTERS = ("block", "kangaroo")  # attend over past tokens: own KV cache in generation


class ZeroFeedForward(nn.Module):
    """Stands in for a decoder block's feed-forward: (..., H) -> zeros (..., H), so the block's
    residual adds nothing after attention (Kangaroo's attention-only adapter)."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden)


class ResidualMLP(nn.Module):
    """h + fc2(gelu(fc1(h))), with fc2 = 0 at start (identity)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.fc2(self.act(self.fc1(hidden)))


def last_real(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, H) -> (B, H) at each row's last real position (works for left and right padding)."""
    if mask is None:
        return hidden[:, -1]
    idx = torch.arange(mask.shape[1], device=mask.device) * mask.to(torch.long)
    last = idx.argmax(1).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@register_head("lm")
class LMHead(ExitHead):
    backbone_families = ("hf-decoder",)

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        dropout: float = 0.0,
        adapter: str = "none",
        untied: bool = False,
        mlp_hidden: int | None = None,
        draft_vocab: int | None = None,
        conditioned: bool = False,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(in_features, num_labels, dropout)
        self.conditioned = flag("lm head", "conditioned", conditioned)
        self.fuse: nn.Linear | None = None
        if self.conditioned:
            if adapter in ("block", "kangaroo"):
                raise ConfigError("conditioned=True works with adapter 'none', 'norm' or 'mlp'")
            self.fuse = nn.Linear(in_features, in_features)
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)
        if draft_vocab is not None and (
            not isinstance(draft_vocab, int) or isinstance(draft_vocab, bool)
            or not 1 <= draft_vocab <= num_labels
        ):
            raise ConfigError(
                f"draft_vocab must be an int in 1..{num_labels} (the vocabulary size); "
                f"got {draft_vocab!r}"
            )
        # Until chosen from data, the subset is the first K ids; saved with the head.
        self.vocab_ids: torch.Tensor | None
        if draft_vocab is None:
            self.vocab_ids = None
        else:
            self.register_buffer("vocab_ids", torch.arange(draft_vocab, dtype=torch.long))
        self._subset_cache: tuple[Any, torch.Tensor] | None = None
        self._transposed_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._absent_cache: tuple[Any, torch.Tensor] | None = None
        if adapter not in ADAPTERS:
            raise ConfigError(
                f"lm head adapter must be one of {', '.join(ADAPTERS)}; got {adapter!r}"
            )
        self.adapter = adapter
        self.untied = flag("lm head", "untied", untied)
        if mlp_hidden is not None and (adapter != "mlp" or isinstance(mlp_hidden, bool)
                                       or not isinstance(mlp_hidden, int) or mlp_hidden < 1):
            raise ConfigError(f"lm head: mlp_hidden sizes the 'mlp' adapter and must be an int "
                              f">= 1; got {mlp_hidden!r} with adapter {adapter!r}")
        width = mlp_hidden or 2 * in_features
        self.mlp = ResidualMLP(in_features, width) if adapter == "mlp" else None
        self.block: nn.Module | None = None
        self.cache_index = -1
        self.layer_type = "full_attention"
        object.__setattr__(self, "_backbone", None)  # shared, deliberately not a submodule
        if backbone is not None:
            self.norm: nn.Module | None = None
            self.lm_head: nn.Module | None = None
            self.init_from_backbone(backbone)
        else:
            self.norm = nn.LayerNorm(in_features)
            self.lm_head = nn.Linear(in_features, num_labels, bias=False)

    # -- binding ----------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        return self._backbone is not None

    @property
    def uses_cache(self) -> bool:
        """True when the head attends over past tokens (``adapter="block"`` or
        ``"kangaroo"``) and so needs the generator's cache and context."""
        return self.block is not None

    def init_from_backbone(self, backbone: nn.Module) -> None:
        """Share the backbone's final norm and LM head; copy the trainable pieces from it."""
        if not (hasattr(backbone, "final_norm") and hasattr(backbone, "lm_logits")):
            raise ConfigError(
                "the 'lm' head needs a decoder backbone with an LM head, not "
                f"{type(backbone).__name__}"
            )
        if self.num_labels != backbone.vocab_size or self.in_features != backbone.hidden_size:
            raise ConfigError(
                f"the 'lm' head must have num_labels = vocab size ({backbone.vocab_size}) and "
                f"in_features = hidden size ({backbone.hidden_size}); got {self.num_labels} and "
                f"{self.in_features}"
            )
        object.__setattr__(self, "_backbone", backbone)
        self.lm_head = copy.deepcopy(backbone.lm_head) if self.untied else None
        own_norm = self.adapter in ("norm", "kangaroo")
        self.norm = copy.deepcopy(backbone.norm) if own_norm else None
        if self.adapter in BLOCK_ADAPTERS:
            self.block = copy.deepcopy(backbone.blocks[backbone.num_layers - 1])
            if self.adapter == "kangaroo":
                if not isinstance(getattr(self.block, "mlp", None), nn.Module):
                    raise ConfigError(
                        f"adapter='kangaroo' needs a decoder block with an 'mlp' feed-forward; "
                        f"{type(self.block).__name__} has none"
                    )
                self.block.mlp = ZeroFeedForward()
                fresh = backbone.model._init_weights  # the reference's fresh adapter
                with torch.no_grad():
                    for module in [*self.block.modules(), *self.norm.modules()]:
                        fresh(module)
            self.cache_index = backbone.num_layers
            self.layer_type = backbone.layer_types[-1]
            for module in self.block.modules():  # its keys/values go to an extra cache layer
                if hasattr(module, "layer_idx"):
                    module.layer_idx = self.cache_index
        ref = backbone.lm_head.weight  # own pieces live where, and in the dtype, the model does
        self.to(device=ref.device, dtype=ref.dtype)
        for p in self.parameters():
            p.requires_grad_(True)

    # -- draft vocabulary -------------------------------------------------------------------
    @property
    def draft_vocab(self) -> int | None:
        """K when the read-out is restricted to ``vocab_ids`` (K,), else None."""
        return None if self.vocab_ids is None else int(self.vocab_ids.numel())

    def set_draft_vocab(self, ids: torch.Tensor | list[int]) -> None:
        """Choose the K token ids the exit reads out (K fixed by ``draft_vocab``)."""
        if self.vocab_ids is None:
            raise ConfigError("this lm head was built without draft_vocab=K")
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() != self.vocab_ids.numel() or ids.unique().numel() != ids.numel():
            raise ConfigError(
                f"need {self.vocab_ids.numel()} distinct token ids, got {ids.numel()} "
                f"({ids.unique().numel()} distinct)"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.num_labels:
            raise ConfigError(f"draft vocabulary ids must be in [0, {self.num_labels})")
        self.vocab_ids.copy_(ids.to(self.vocab_ids.device))
        self._subset_cache = None
        self._transposed_cache = None

    def _subset_weight(self) -> torch.Tensor:
        """(K, H) rows of the (own or shared) LM head for ``vocab_ids``, gathered once per
        (weight version, ids version) so drafting reads a contiguous K x H matrix."""
        weight = self._lm_head_module().weight
        key = (id(weight), weight._version, self.vocab_ids._version, weight.requires_grad)
        if self._subset_cache is None or self._subset_cache[0] != key or torch.is_grad_enabled():
            sub = weight.index_select(0, self.vocab_ids)
            if torch.is_grad_enabled() and weight.requires_grad:
                return sub  # training an untied head: no cache, keep the graph
            self._subset_cache = (key, sub.detach())
        return self._subset_cache[1]

    def _lm_head_module(self) -> nn.Module:
        if self.lm_head is not None:
            return self.lm_head
        return self._backbone.lm_head

    # -- forward ----------------------------------------------------------------------------
    def token_logits(self, hidden: torch.Tensor, ctx: Any = None,
                     condition: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position: hidden (B, q, H) -> (B, q, V).

        ``ctx`` (a :class:`~exitwise.backbones.hf_decoder.DecodeContext`) is needed only by
        ``adapter="block"`` / ``"kangaroo"`` during cached generation; without it the block sees
        the q tokens alone, causally, at positions 0..q-1. With a draft vocabulary, ids outside
        it get -inf.
        """
        return self._vocab_logits(self._transform(hidden, ctx, condition))

    def compact_logits(self, hidden: torch.Tensor, ctx: Any = None,
                       condition: torch.Tensor | None = None) -> torch.Tensor:
        """(B, q, H) -> (B, q, K) logits over ``vocab_ids`` (K = V without a draft
        vocabulary, in token-id order)."""
        hidden = self._transform(hidden, ctx, condition)
        if self.vocab_ids is None:
            return self._readout(hidden)
        return self._compact_readout(hidden)

    @torch.no_grad()
    def draft_logits(self, hidden: torch.Tensor, ctx: Any = None,
                     condition: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`compact_logits` for drafting (inference only), (B, q, H) -> (B, q, K).

        With a draft vocabulary the K x H read-out is kept a second time, transposed (H x K,
        contiguous), because a one-row product with it was faster than ``F.linear`` on CPUs
        measured here (``exit_head_q1_ms`` in ``component_costs_ms`` of
        benchmarks/results/lm_speed.json). Equal to :meth:`compact_logits` up to float
        round-off; a draft only proposes tokens, so decoding stays lossless.
        """
        if self.vocab_ids is None or self._backbone is None or hidden.is_cuda:
            return self.compact_logits(hidden, ctx, condition)
        return self._compact_readout(self._transform(hidden, ctx, condition), transposed=True)

    def _vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V); -inf outside the draft vocabulary when there is one."""
        if self.vocab_ids is None:
            return self._readout(hidden)
        return self.expand_logits(self._compact_readout(hidden))

    def expand_logits(self, compact: torch.Tensor) -> torch.Tensor:
        """(..., K) compact logits -> (..., V), -inf outside the draft vocabulary."""
        if self.vocab_ids is None:
            return compact
        full = compact.new_full((*compact.shape[:-1], self.num_labels), float("-inf"))
        return full.index_copy(-1, self.vocab_ids, compact)

    def compact_argmax(self, compact: torch.Tensor) -> torch.Tensor:
        """Token ids of the argmax of (..., K) compact logits."""
        top = compact.argmax(-1)
        return top if self.vocab_ids is None else self.vocab_ids[top]

    def compact_topk(self, compact: torch.Tensor, k: int) -> torch.Tensor:
        """Token ids (..., k) of the k largest of (..., K) compact logits, best first."""
        top = compact.topk(min(k, compact.shape[-1]), -1).indices
        return top if self.vocab_ids is None else self.vocab_ids[top]

    def _compact_readout(self, hidden: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """(..., H) -> (..., K) over ``vocab_ids``; ``transposed``: multiply by a cached
        contiguous H x K copy of the read-out (the fast one-row kernel, inference only)."""
        backbone = self._backbone
        if backbone is None:
            normed = self.norm(hidden)
            return torch.nn.functional.linear(normed, self.lm_head.weight[self.vocab_ids])
        normed = self.norm(hidden) if self.norm is not None else backbone.final_norm(hidden)
        weight = self._subset_weight()
        bias = getattr(self._lm_head_module(), "bias", None)
        if bias is not None:
            bias = bias.index_select(0, self.vocab_ids)
        if not transposed:
            return backbone.postprocess_logits(torch.nn.functional.linear(normed, weight, bias))
        cached = self._transposed_cache
        if cached is None or cached[0] is not weight:
            cached = (weight, weight.t().contiguous())
            self._transposed_cache = cached
        out = normed @ cached[1]
        return backbone.postprocess_logits(out if bias is None else out + bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, V) at each row's last real token.

        hidden: (B, T, H) with mask (B, T); (B, H) flat features; (B, H, *spatial) pooled.
        """
        if hidden.dim() == 2:
            hidden, mask = hidden.unsqueeze(1), None
        elif hidden.dim() > 3:
            hidden, mask = self.spatial_mean(hidden).unsqueeze(1), None
        if self.block is None:  # position-wise: read only the last real token
            return self.token_logits(last_real(hidden, mask).unsqueeze(1))[:, 0]

        real = torch.ones(hidden.shape[:2], dtype=torch.long) if mask is None else mask.long()
        real = real.to(hidden.device)
        ctx = DecodeContext(cache=None, positions=prompt_positions(real), attention_mask=real)
        out = self._transform(hidden, ctx)
        return self._vocab_logits(last_real(out, mask).unsqueeze(1))[:, 0]

    def _condition_norm(self, condition: torch.Tensor) -> torch.Tensor:
        norm = self._backbone.final_norm if self._backbone is not None else self.norm
        return norm(condition)

    def _absent_shift(self, hidden: torch.Tensor) -> torch.Tensor:
        """(H,) what a missing condition adds: ``fuse(norm(0))``, as for a dropped condition in
        training. A constant of the weights, so drafting (no grad) computes it once per
        weight version instead of at every later draft."""
        if torch.is_grad_enabled():
            return self.fuse(self._condition_norm(hidden.new_zeros(hidden.shape[-1])))
        params = [*self.fuse.parameters(),
                  *(self._backbone.norm if self._backbone is not None else self.norm).parameters()]
        key = (hidden.dtype, hidden.device, *((id(q), q._version) for q in params))
        cached = self._absent_cache
        if cached is None or cached[0] != key:
            shift = self.fuse(self._condition_norm(hidden.new_zeros(hidden.shape[-1])))
            cached = self._absent_cache = (key, shift)
        return cached[1]

    def _transform(self, hidden: torch.Tensor, ctx: Any,
                   condition: torch.Tensor | None = None) -> torch.Tensor:
        """Dropout, the condition (``conditioned`` heads) and the trainable adapter (mlp /
        block / kangaroo): (B, q, H) -> (B, q, H)."""
        hidden = self.dropout(hidden)
        if self.fuse is not None:
            if condition is None:
                hidden = hidden + self._absent_shift(hidden)
            else:
                hidden = hidden + self.fuse(self._condition_norm(condition.to(hidden.dtype)))
        if self.mlp is not None:
            hidden = self.mlp(hidden)
        if self.block is not None:
            if ctx is None:
                real = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
                ctx = DecodeContext(None, prompt_positions(real), real)
            hidden = self._backbone.run_block(
                self.block, self.cache_index, self.layer_type, hidden, ctx
            )
        return hidden

    def _readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Norm + LM head (own or shared) + the model's logit scaling: (..., H) -> (..., V)."""
        backbone = self._backbone
        if backbone is None:
            return self.lm_head(self.norm(hidden))
        normed = self.norm(hidden) if self.norm is not None else backbone.final_norm(hidden)
        return backbone.lm_logits(normed, self.lm_head)

    # -- cost -------------------------------------------------------------------------------
    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """LM head on one position (2 H V) + adapter; a block adapter also runs over the row's
        real tokens (projections, MLP (not for ``kangaroo``) and causal attention pairs)."""
        flops = 2.0 * self.in_features * (self.draft_vocab or self.num_labels)
        if self.mlp is not None:
            flops += self.linear_flops(self.mlp.fc1, self.mlp.fc2)
        if self.fuse is not None:
            flops += self.linear_flops(self.fuse)
        out = torch.full((batch_size,), flops, dtype=torch.float64)
        if self.block is not None:
            backbone = self._backbone
            n = (
                torch.ones(batch_size, dtype=torch.float64)
                if mask is None
                else mask.sum(1).to(torch.float64).cpu()
            )
            pairs = n * (n + 1) / 2
            macs = backbone.token_macs()
            if self.adapter == "kangaroo":  # Q, O and K, V projections only: no feed-forward
                macs = float(backbone.hidden_size * backbone.head_dim
                             * (2 * backbone.num_heads + 2 * backbone.num_kv_heads))
            out = out + 2.0 * (
                n * macs + pairs * 2.0 * backbone.num_heads * backbone.head_dim
            )
        return out

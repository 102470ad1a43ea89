"""Adapter for Hugging Face causal LMs (Llama family, GPT-2), driven by :mod:`decoder_layouts`.

Two faces:

- the :class:`~exitwise.backbones.Backbone` contract (``start / step / features / keep``) over
  a whole (left- or right-padded) sequence without a cache, so the executor, the multi-exit
  model and the training recipes treat a decoder like any other stack of blocks;
- an incremental API for the generators in :mod:`exitwise.generation`: :meth:`embed`,
  :meth:`run_layers` (layers ``[start, end)`` writing their keys/values into an HF
  ``DynamicCache``), :meth:`final_norm` and :meth:`lm_logits`.

No model's ``forward`` is copied: the adapter calls the model's own embedding, rotary table,
blocks, final norm and LM head, and builds masks with transformers' ``create_causal_mask``.
Shapes: B batch rows, q new tokens, S tokens already in the cache, H hidden size, V vocab.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError, UnsupportedModelError
from .base import Backbone, BackboneState, resolve_path
from .decode_context import (  # DecodeContext, prompt_positions: importable from here as before
    DecodeContext,
    cache_keyword,
    decode_sdpa_mask,
    prompt_positions,
)
from .decoder_layouts import DECODER_LAYOUTS, DecoderLayout, supported_decoder_types
from .gqa_attention import gqa_view, grouped
from .kernels import routed

FULL, SLIDING = "full_attention", "sliding_attention"
#: a block's two sub-layers, in the order a block runs them (:meth:`HFDecoderBackbone.run_part`)
PARTS = ("attn", "mlp")
# What a batch may hold (Hugging Face's names); anything else is refused, not ignored.
DECODER_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids"})


class HFDecoderBackbone(Backbone):
    """A Hugging Face ``...ForCausalLM`` as a stack of decoder blocks plus its LM head.

    ``start`` takes input_ids (B, T), attention_mask (B, T) (left or right padding), and
    optional position_ids (B, T); default positions count real tokens (0 on padding).
    """

    family = "hf-decoder"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in DECODER_LAYOUTS:
            hint = (
                " For Gemma-3 text generation load the text model, Gemma3ForCausalLM "
                "(model_type 'gemma3_text'), not the multimodal Gemma3ForConditionalGeneration."
                if model_type == "gemma3" else ""
            )
            raise UnsupportedModelError(
                f"decoder model_type {model_type!r} is not supported; supported: "
                f"{', '.join(supported_decoder_types())}. Add a row to "
                "exitwise.backbones.decoder_layouts.DECODER_LAYOUTS for a Llama-like model."
                + hint
            )
        if getattr(config, "use_bidirectional_attention", False):
            # EmbeddingGemma-style configs attend both ways: not a causal LM, and the causal
            # masks built here would silently change what the model computes.
            raise UnsupportedModelError(
                f"{type(model).__name__} has use_bidirectional_attention=True: it is an "
                "encoder, not a causal LM; early-exit decoding needs causal attention"
            )
        layout: DecoderLayout = DECODER_LAYOUTS[model_type]
        base = resolve_path(model, layout.base)
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if base is None or not isinstance(lm_head, nn.Linear):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a causal LM with an LM head: give the "
                "...ForCausalLM / ...LMHeadModel model (e.g. AutoModelForCausalLM), not the bare "
                "decoder"
            )
        self.model = model
        self.config = config
        self.model_type: str = model_type
        self.layout = layout
        self.base = base
        self.cache_kw = cache_keyword()  # looked up once, not per block call
        self.embed_tokens = resolve_path(base, layout.embed)
        self.blocks = resolve_path(base, layout.layers)
        self.norm = resolve_path(base, layout.norm)
        self.rotary = resolve_path(base, layout.rotary)
        self.wpe = resolve_path(base, layout.wpe)
        self.drop = resolve_path(base, layout.dropout)
        self.lm_head = lm_head
        if self.embed_tokens is None or self.blocks is None or self.norm is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not have the layout expected for {model_type!r}"
            )
        if (layout.positions == "rope") != (self.rotary is not None):
            raise UnsupportedModelError(f"{type(model).__name__}: position module not found")
        self.num_layers = len(self.blocks)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // self.num_heads)
        inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        self.intermediate_size = int(inner or 4 * self.hidden_size)
        self.layer_types: list[str] = self._layer_types()
        self.sliding_window: int | None = getattr(config, "sliding_window", None)
        self.max_positions: int | None = (
            int(config.max_position_embeddings) if layout.positions == "learned" else None
        )
        # id(block) -> (block, the block to run for several new tokens under a mask on a CPU:
        # its GQA view, :mod:`.gqa_attention`, or itself); per wrapper, so per generate call
        self._gqa_views: dict[int, tuple[nn.Module, nn.Module]] = {}

    def _layer_types(self) -> list[str]:
        """Per block: full or sliding-window attention, as the model's own forward decides."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return [SLIDING if t == SLIDING else FULL for t in types[: self.num_layers]]
        if getattr(self.config, "sliding_window", None) is not None:
            return [SLIDING] * self.num_layers  # Mistral / Phi-3: every layer slides
        return [FULL] * self.num_layers

    # -- facts ------------------------------------------------------------------------------
    def feature_dim(self, layer: int) -> int:
        return self.hidden_size

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "name_or_path": getattr(self.config, "_name_or_path", "") or "",
            "architecture": type(self.model).__name__,
        }

    # -- incremental API (used by exitwise.generation) ---------------------------------------
    def new_cache(self) -> Any:
        """An empty ``DynamicCache`` with full-attention layers for every block.

        Sliding windows are applied by the masks instead of by dropping old keys, so the cache
        can always be cropped back (speculative decoding rolls back rejected drafts).
        """
        from transformers import DynamicCache

        return DynamicCache()

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embeddings: ids (B, q), positions (B, q) -> (B, q, H)."""
        hidden = self.embed_tokens(input_ids)
        if self.layout.embed_multiplier:
            hidden = hidden * getattr(self.config, self.layout.embed_multiplier)
        if self.wpe is not None:
            # Speculative drafts may run a few positions past a row's budget; those tokens are
            # never emitted, so clamping keeps them in range without changing any output.
            hidden = hidden + self.wpe(positions.clamp(max=self.max_positions - 1))
        if self.drop is not None:
            hidden = self.drop(hidden)
        return hidden

    def run_layers(
        self, hidden: torch.Tensor, start: int, end: int, ctx: DecodeContext
    ) -> torch.Tensor:
        """Apply blocks ``[start, end)`` to hidden (B, q, H); returns (B, q, H).

        With ``ctx.cache`` each block appends the q new keys/values to its cache layer; all
        blocks in the range must hold the same number of slots S (the mask is built once).
        """
        if not 0 <= start <= end <= self.num_layers:
            raise InputError(f"layer range [{start}, {end}) is outside 0..{self.num_layers}")
        for i in range(start, end):
            hidden = self.run_block(self.blocks[i], i, self.layer_types[i], hidden, ctx)
        return hidden

    def run_block(
        self, block: nn.Module, cache_index: int, layer_type: str, hidden: torch.Tensor,
        ctx: DecodeContext,
    ) -> torch.Tensor:
        """Apply one decoder block (the model's own, or a copy owned by an exit head whose
        attention writes to cache layer ``cache_index``)."""
        block = routed(block, hidden)  # few-row kernels, where this row count pays (kernels.py)
        mask = self._mask(hidden, ctx, cache_index, layer_type)
        if mask is not None:  # (plain one-token steps have none: nothing to look up)
            block = self._attention_view(block, hidden, mask)  # no copies of the cached k/v
        use_cache = ctx.cache is not None
        if self.layout.positions == "rope":
            out = block(
                hidden,
                attention_mask=mask,
                position_ids=ctx.positions,
                use_cache=use_cache,
                position_embeddings=self._rope(hidden, ctx, layer_type),
                **{self.cache_kw: ctx.cache},
            )
        else:
            out = block(hidden, attention_mask=mask, use_cache=use_cache,
                        **{self.cache_kw: ctx.cache})
        return out[0] if isinstance(out, tuple) else out

    def _attention_view(self, block: nn.Module, hidden: torch.Tensor, mask: Any) -> nn.Module:
        """The block to run on hidden (B, q, H) under ``mask``: for several new tokens under a
        mask on a CPU its GQA view when its attention has key/value groups under SDPA (made
        once per block), else the block itself."""
        if mask is None or hidden.shape[1] == 1 or hidden.device.type != "cpu":
            return block
        known = self._gqa_views.get(id(block))
        if known is None or known[0] is not block:
            attn = self.layout.attn
            view = gqa_view(block, attn) if grouped(block, attn) else block
            known = self._gqa_views[id(block)] = (block, view)
        return known[1]

    def run_part(self, i: int, part: str, hidden: torch.Tensor, ctx: DecodeContext
                 ) -> torch.Tensor:
        """One sub-layer of block ``i``: ``part`` "attn" (which appends the q new keys/values
        to cache layer i when ``ctx.cache`` is set) or "mlp". hidden (B, q, H) -> (B, q, H):
        hidden + scale * post(part(pre(hidden))), the block's own arithmetic, so running
        "attn" then "mlp" equals :meth:`run_block` (self-drafts leave some out)."""
        if part not in PARTS:
            raise InputError(f"a block's part is one of {PARTS}; got {part!r}")
        block = routed(self.blocks[i], hidden)
        lay = self.layout
        pre, post = lay.attn_norms if part == "attn" else lay.mlp_norms
        x = getattr(block, pre)(hidden) if pre else hidden
        if part == "attn":
            mask = self._mask(hidden, ctx, i, self.layer_types[i])
            block = self._attention_view(block, hidden, mask)
            kwargs: dict[str, Any] = {
                "attention_mask": mask,
                "use_cache": ctx.cache is not None, self.cache_kw: ctx.cache}
            if lay.positions == "rope":
                kwargs.update(position_ids=ctx.positions,
                              position_embeddings=self._rope(hidden, ctx, self.layer_types[i]))
            out = getattr(block, lay.attn)(x, **kwargs)[0]
        else:
            out = getattr(block, lay.mlp)(x)
        if post:
            out = getattr(block, post)(out)
        if lay.residual_scale:
            out = out * getattr(block, lay.residual_scale)
        return hidden + out

    def part_sizes(self) -> list[tuple[int, int]]:
        """(attention, feed-forward) parameter counts of every block (norms included): the
        weights a decoding pass reads, which set its cost on a CPU."""
        lay = self.layout

        def size(block: nn.Module, names: tuple[str | None, ...]) -> int:
            return sum(p.numel() for n in names if n
                       for p in getattr(block, n).parameters())

        return [(size(b, (lay.attn, *lay.attn_norms)), size(b, (lay.mlp, *lay.mlp_norms)))
                for b in self.blocks]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm: (..., H) -> (..., H)."""
        return self.norm(hidden)

    def lm_logits(self, hidden: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """Normed hidden (..., H) -> logits (..., V) through the shared LM head (or ``lm_head``),
        with the model's own output scaling / soft-capping."""
        logits = routed(lm_head or self.lm_head, hidden, single=True)(hidden)
        return self.postprocess_logits(logits)

    def postprocess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.layout.logits_divisor:
            logits = logits / getattr(self.config, self.layout.logits_divisor)
        softcap = self.layout.logits_softcap
        cap = getattr(self.config, softcap, None) if softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _rope(
        self, hidden: torch.Tensor, ctx: DecodeContext, layer_type: str = FULL
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, q, head_dim), for the new tokens' positions, memoized per call.

        Models with one table per attention type (Gemma-3: local theta for sliding-window
        blocks, global theta for full-attention blocks) get the block's ``layer_type``.
        """
        if not self.layout.rope_per_layer_type:
            key: tuple[Any, ...] = ("rope", hidden.dtype)
            if key not in ctx._memo:
                ctx._memo[key] = self.rotary(hidden, ctx.positions)
            return ctx._memo[key]
        key = ("rope", hidden.dtype, layer_type)
        if key not in ctx._memo:
            ctx._memo[key] = self.rotary(hidden, ctx.positions, layer_type)
        return ctx._memo[key]

    def _mask(
        self, hidden: torch.Tensor, ctx: DecodeContext, cache_index: int, layer_type: str
    ) -> Any:
        """The block's attention mask in the format of the configured attention back-end.

        Built by transformers' own mask functions against cache layer ``cache_index`` (its
        length gives the query offset), memoized per (type, slots already cached); a
        decoding pass of a full-attention block under SDPA takes the equal
        :func:`~.decode_context.decode_sdpa_mask` instead.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        cached = ctx.cache.get_seq_length(cache_index) if ctx.cache is not None else 0
        kv_len = ctx.attention_mask.shape[1]
        if cached + hidden.shape[1] != kv_len:
            raise InputError(
                f"attention_mask covers {kv_len} slots but cache layer {cache_index} holds "
                f"{cached} + {hidden.shape[1]} new"
            )
        window = self.sliding_window
        sliding = layer_type == SLIDING and window is not None and kv_len > window
        key = ("mask", sliding, cached, hidden.dtype)
        if key in ctx._memo:
            return ctx._memo[key]
        q = hidden.shape[1]
        if (cached and not sliding and ctx.tree is None
                and getattr(self.config, "_attn_implementation", None) == "sdpa"):
            mask = decode_sdpa_mask(ctx.attention_mask, cached, q)
            ctx._memo[key] = mask
            return mask
        kwargs = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=ctx.attention_mask,
            position_ids=ctx.positions,
            **{self.cache_kw: ctx.cache},
            layer_idx=cache_index,
        )
        # Restrictions on top of causality and the holes, as (B, q, kv) bool tensors: a
        # sliding window by positions (holes make slot distance differ from token distance)
        # and a token tree's ancestors. Applied to HF's own mask directly: routing them
        # through its mask-function interface costs milliseconds per build on a CPU.
        keep = None
        if sliding and (ctx.slot_positions is not None or ctx.tree is not None):
            if ctx.slot_positions is None:
                raise InputError("a token tree over a sliding window needs slot_positions")
            slot_pos = ctx.slot_positions.to(hidden.device)
            keep = slot_pos[:, None, :] > slot_pos[:, -q:, None] - window
        if ctx.tree is not None:
            start = ctx.tree_start
            on_path = torch.ones(q, kv_len, dtype=torch.bool, device=hidden.device)
            rel = cached - start  # the first query's row in the tree
            on_path[:, start:] = ctx.tree.to(hidden.device)[rel: rel + q, : kv_len - start]
            keep = on_path[None] if keep is None else keep & on_path[None]
        if keep is None:
            if sliding:  # no holes: slot distance is token distance, HF's window is right
                mask = create_sliding_window_causal_mask(**kwargs)
            else:
                mask = create_causal_mask(**kwargs)
        else:
            mask = create_causal_mask(**kwargs, allow_is_causal_skip=False)
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                if mask.dtype == torch.bool:
                    mask = mask & keep[:, None]
                else:  # an additive float mask (eager attention)
                    mask = mask.masked_fill(~keep[:, None], torch.finfo(mask.dtype).min)
            else:  # another back-end's format (e.g. flex attention): its mask functions
                def restrict(batch_idx, head_idx, q_idx, kv_idx):
                    return keep[batch_idx, q_idx - (kv_len - q), kv_idx]

                mask = create_causal_mask(**kwargs, and_mask_function=restrict)
        ctx._memo[key] = mask
        return mask

    # -- the Backbone contract (whole sequences, no cache) ----------------------------------
    def check_inputs(self, **inputs: Any) -> torch.Tensor:
        """Validate a token batch; return its attention mask (B, T) (all ones if absent)."""
        extra = sorted(set(inputs) - DECODER_INPUTS)
        if extra:  # a misspelt attention_mask would otherwise run every row unmasked
            raise InputError(f"unexpected inputs {extra} for a decoder: it takes "
                             f"{', '.join(sorted(DECODER_INPUTS))}")
        ids = inputs.get("input_ids")
        if ids is None:
            raise InputError("give input_ids (B, T)")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            shape = getattr(ids, "shape", ids)
            raise InputError(f"input_ids must be a (batch, seq_len) tensor; got {shape}")
        self.check_batch(ids.shape[0])
        if ids.shape[1] == 0:
            raise InputError("the prompts are empty (seq_len 0): give at least one token per row")
        if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
            raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids are {tuple(ids.shape)}"
            )
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            # positions are counted along the mask: other values would shift them
            raise InputError("attention_mask must hold 1 (a token) and 0 (padding); got values "
                             f"{sorted(set(mask.unique().tolist()))[:6]}")
        if bool((mask.sum(1) == 0).any()):
            raise InputError("a row of attention_mask is all zeros (an empty prompt)")
        real = ids[mask.bool()]
        if int(real.min()) < 0 or int(real.max()) >= self.vocab_size:
            raise InputError(
                f"input_ids must be in [0, {self.vocab_size}); got "
                f"{int(real.min())}..{int(real.max())}"
            )
        return mask.long()

    def start(self, **inputs: Any) -> BackboneState:
        mask = self.check_inputs(**inputs)
        positions = inputs.get("position_ids")
        if positions is None:
            positions = prompt_positions(mask)
        ids = inputs["input_ids"].long().clamp(0, self.vocab_size - 1)
        hidden = self.embed(ids, positions)
        state = BackboneState(hidden=hidden, mask=mask, rows={"positions": positions})
        return self.refresh(state)

    def refresh(self, state: BackboneState) -> BackboneState:
        state.shared["ctx"] = DecodeContext(
            cache=None, positions=state.rows["positions"], attention_mask=state.mask
        )
        return state

    def step(self, i: int, state: BackboneState) -> BackboneState:
        state.hidden = self.run_block(
            self.blocks[i], i, self.layer_types[i], state.hidden, state.shared["ctx"]
        )
        return state

    def reference(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own forward: the last block's output (B, T, H) before the final norm
        (what the exit heads read), captured with a hook on the final norm, and the mask."""
        mask = self.check_inputs(**inputs)
        positions = inputs.get("position_ids")
        if positions is None:
            positions = prompt_positions(mask)
        seen: list[torch.Tensor] = []
        hook = self.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            self.model(
                input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions,
                use_cache=False,
            )
        finally:
            hook.remove()
        return seen[-1], mask

    # -- cost model -------------------------------------------------------------------------
    def token_macs(self) -> float:
        """Multiply-adds of one block per token, excluding attention over the context."""
        h, hd = float(self.hidden_size), float(self.head_dim)
        proj = h * hd * (2 * self.num_heads + 2 * self.num_kv_heads)  # Q, O and K, V
        mlp = (3.0 if self.layout.gated_mlp else 2.0) * h * self.intermediate_size
        return proj + mlp

    def layer_flops(self, i: int, state: BackboneState) -> torch.Tensor:
        """FLOPs (2 x multiply-adds) of block i per row over its n real tokens: projections and
        MLP per token, plus scores and weighted sum over the n(n+1)/2 causal pairs."""
        n = state.mask.sum(1).to(torch.float64)
        pairs = n * (n + 1) / 2
        return 2.0 * (n * self.token_macs() + pairs * 2.0 * self.num_heads * self.head_dim)

"""Where each Hugging Face causal LM keeps its parts, keyed by ``config.model_type``.

This table is the only per-architecture knowledge the decoder adapter has. Llama-like models
differ in details the layers themselves already handle (QK-norm, post-norms, fused QKV,
residual multipliers); what is left for the adapter is a handful of conventions:

- where the embedding, the blocks, the final norm and the rotary table live;
- rotary positions (passed to every block) or learned absolute positions (GPT-2's ``wpe``);
- extra scalings done in the model's own ``forward``: Granite's ``embedding_multiplier``
  (the input) and ``logits_scaling`` (the output), Gemma-2's ``final_logit_softcapping``.
  Gemma's sqrt(hidden) embedding normalizer lives in its embedding module (Gemma-3's
  ``Gemma3TextScaledWordEmbedding`` too), so it needs nothing here;
- one rotary table for every block, or one per attention type: Gemma-3's rotary module holds
  a local table (``rope_local_base_freq``, sliding-window blocks) and a global one (full-
  attention blocks) and takes the block's layer type as a third argument;
- a block's two sub-layers, for drafting without some of them (Draft & Verify, SWIFT): each
  adds ``post(part(pre(x)))`` to the residual stream, times a residual multiplier (Granite);
  the names of the attention and feed-forward modules and of the norms around each.

Which blocks slide is read from ``config.layer_types`` (or ``sliding_window`` alone), not from
this table.

A new Llama-like model is one new row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderLayout:
    """Attribute paths and calling conventions of one causal LM family.

    base:        the bare decoder inside the ``...ForCausalLM`` model.
    embed:       token embedding module (relative to ``base``).
    layers:      ModuleList of decoder blocks (relative to ``base``).
    norm:        final norm applied before the LM head (relative to ``base``).
    positions:   "rope" (``rotary`` gives (cos, sin) passed to every block) or "learned"
                 (``wpe`` position embedding added to the token embedding, GPT-2).
    rotary:      rotary embedding module (relative to ``base``), for "rope".
    wpe:         learned position embedding (relative to ``base``), for "learned".
    dropout:     embedding dropout module applied after the embeddings, if any.
    embed_multiplier: config attribute scaling the embeddings (Granite).
    logits_divisor:   config attribute the logits are divided by (Granite).
    logits_softcap:   config attribute for tanh soft-capping of the logits (Gemma-2/3).
    rope_per_layer_type: ``rotary(hidden, positions, layer_type)`` gives a different (cos, sin)
                 per attention type ("sliding_attention" / "full_attention"), Gemma-3.
    gated_mlp:   the feed-forward has three matrices (gate, up, down) instead of two.
    attn, mlp:   a block's attention and feed-forward modules.
    attn_norms, mlp_norms: (pre, post) norms around each (None: none there), as the block's
                 own ``forward`` applies them: Llama-like pre-norm only, Gemma-2/3 both,
                 OLMo-2 post-norm only.
    residual_scale: a block attribute each sub-layer's output is multiplied by before it is
                 added to the residual stream (Granite's ``residual_multiplier``).
    """

    base: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    norm: str = "norm"
    positions: str = "rope"
    rotary: str | None = "rotary_emb"
    wpe: str | None = None
    dropout: str | None = None
    embed_multiplier: str | None = None
    logits_divisor: str | None = None
    logits_softcap: str | None = None
    rope_per_layer_type: bool = False
    gated_mlp: bool = True
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norms: tuple[str | None, str | None] = ("input_layernorm", None)
    mlp_norms: tuple[str | None, str | None] = ("post_attention_layernorm", None)
    residual_scale: str | None = None


_LLAMA = DecoderLayout()
# Gemma-2/3 normalize both sides of each sub-layer (sandwich norms)
_SANDWICH = dict(attn_norms=("input_layernorm", "post_attention_layernorm"),
                 mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"))

DECODER_LAYOUTS: dict[str, DecoderLayout] = {
    "llama": _LLAMA,  # also SmolLM2, TinyLlama, Llama-2/3
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,  # embedding module applies the sqrt(hidden) normalizer itself
    "gemma2": DecoderLayout(logits_softcap="final_logit_softcapping", **_SANDWICH),
    # Gemma-3 text (Gemma3ForCausalLM): local/global rotary tables, QK-norm inside attention,
    # soft-capping only if the config sets it (None in released checkpoints).
    "gemma3_text": DecoderLayout(
        logits_softcap="final_logit_softcapping", rope_per_layer_type=True, **_SANDWICH
    ),
    "phi3": _LLAMA,  # its residual dropouts are identities at inference
    "olmo2": DecoderLayout(attn_norms=(None, "post_attention_layernorm"),
                           mlp_norms=(None, "post_feedforward_layernorm")),
    "granite": DecoderLayout(
        embed_multiplier="embedding_multiplier", logits_divisor="logits_scaling",
        residual_scale="residual_multiplier",
    ),
    "gpt2": DecoderLayout(
        base="transformer",
        embed="wte",
        layers="h",
        norm="ln_f",
        positions="learned",
        rotary=None,
        wpe="wpe",
        dropout="drop",
        gated_mlp=False,
        attn="attn",
        attn_norms=("ln_1", None),
        mlp_norms=("ln_2", None),
    ),
}


def supported_decoder_types() -> list[str]:
    return sorted(DECODER_LAYOUTS)

"""Tiny random causal LMs of every supported decoder family, built in memory.

``tiny_lm(family)`` gives a 4-layer, 32-wide model in eval mode whose blocks' contributions
to the residual stream are damped, so that early exits often (not always) agree with the
last layer: self-speculative tests then see both accepted and rejected drafts.
"""

from __future__ import annotations

import torch

VOCAB = 100
PAD, BOS, EOS = 0, 1, 2
LAYERS = 4

DECODER_FAMILIES = [
    "llama", "qwen2", "mistral", "gemma", "gpt2", "qwen3", "gemma2", "phi3", "olmo2", "granite",
    "gemma3_text",
]
# Family names are config.model_type; "gemma3" is accepted as a short name for Gemma-3 text.
_ALIASES = {"gemma3": "gemma3_text"}
REQUIRED_FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2"]

# Per family: parameters (name suffixes inside a block) that scale what a block adds to the
# residual stream, and how to damp them.
_OUT_PROJ = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
_DAMP = {
    "gpt2": ("attn.c_proj.weight", "mlp.c_proj.weight"),
    "olmo2": ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"),
    "gemma2": ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"),
    "gemma3_text": ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"),
}
_ONE_PLUS_W_NORMS = ("gemma2", "gemma3_text")  # Gemma norms scale by (1 + w)


# How much to damp: enough for early exits to agree often, not always.
_DAMP_FACTOR = {"gemma": 1.0, "granite": 1.0}


def tiny_lm(family: str, seed: int = 0, damp: float | None = None, layers: int = LAYERS):
    import transformers as tf

    family = _ALIASES.get(family, family)
    damp = _DAMP_FACTOR.get(family, 0.3) if damp is None else damp

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **common,
    )
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **llama_like))
    elif family == "mistral":  # a short window, so the sliding-window masks matter
        model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=8, head_dim=8, **llama_like))
    elif family == "gemma":  # sqrt(hidden) embedding normalizer
        # Untied: a random model with tied embeddings just repeats its input token.
        model = tf.GemmaForCausalLM(
            tf.GemmaConfig(head_dim=8, tie_word_embeddings=False, **llama_like)
        )
    elif family == "gemma2":  # alternating sliding/full layers, logit soft-capping, eager attention
        model = tf.Gemma2ForCausalLM(
            tf.Gemma2Config(
                head_dim=8, sliding_window=6, query_pre_attn_scalar=8,
                final_logit_softcapping=3.0, attn_logit_softcapping=50.0, **llama_like,
            )
        )
    elif family == "gemma3_text":
        # Sliding/full mix with a short window, two rotary tables (local theta 10k for the
        # sliding blocks, global 1M for the full ones), QK-norm; untied like "gemma".
        model = tf.Gemma3ForCausalLM(
            tf.Gemma3TextConfig(
                head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                layer_types=(["sliding_attention", "sliding_attention", "full_attention",
                              "sliding_attention"] * layers)[:layers],
                rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                tie_word_embeddings=False, **llama_like,
            )
        )
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**llama_like))
    elif family == "olmo2":
        model = tf.Olmo2ForCausalLM(tf.Olmo2Config(**llama_like))
    elif family == "granite":
        model = tf.GraniteForCausalLM(
            tf.GraniteConfig(
                embedding_multiplier=3.0, logits_scaling=2.0, residual_multiplier=0.7,
                attention_multiplier=0.2, **llama_like,
            )
        )
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(
                n_embd=32, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, **common,
            )
        )
    else:  # pragma: no cover
        raise ValueError(family)
    model.eval()
    suffixes = _DAMP.get(family, _OUT_PROJ)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffixes):
                if family in _ONE_PLUS_W_NORMS:
                    p.fill_(damp - 1.0)
                else:
                    p.mul_(damp)
    return model


def left_padded(lengths=(7, 3, 5), seed: int = 1, pad_id: int = PAD):
    """Left-padded prompts: input_ids, attention_mask (B, max(lengths)); ids avoid BOS/EOS."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, t - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[r, t - n :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, eos=None):
    """Hugging Face's own greedy generation (the reference)."""
    return model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
        pad_token_id=PAD, eos_token_id=eos, num_beams=1,
    )


def full_cache(model, tokens):
    """Keys/values of the HF model's own forward over ``tokens`` (1, n), full-attention cache
    (the keyword and output field follow the installed transformers version)."""
    from transformers import DynamicCache

    from exitwise.backbones.hf_decoder import cache_keyword

    with torch.no_grad():
        out = model(input_ids=tokens, use_cache=True, **{cache_keyword(): DynamicCache()})
    return getattr(out, cache_keyword())

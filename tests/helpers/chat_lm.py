"""A tiny random Llama saved like a hub checkpoint, with a word-level tokenizer and a chat
template: what the CLI and the benchmark harness load by path (no SmolLM2, no network)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "hat", "big", "red", "is", "hi",
         "what", "why", "how", "sky", "blue", "sea", "poem"]
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")


def save_tiny_chat_llama(d: Path, bos: bool = False) -> Path:
    """A 4-layer random Llama (vocab 64) + a word-level tokenizer with a chat template.
    ``bos``: the tokenizer adds ``<bos>`` to text and the template writes it, as Llama's,
    Gemma's and Mistral's do."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    if bos:
        core.post_processor = TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )
    tok.chat_template = ("{{ bos_token }}" if bos else "") + CHAT
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    lm = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked next-token distributions: agreement is meaningful
        lm.lm_head.weight.mul_(20.0)
    lm.save_pretrained(d)
    return d

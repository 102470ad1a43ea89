"""Prompts as a decoder LM should see them: user turns wrapped in the tokenizer's chat template
(when it has one) and tokenized with the special tokens the model expects (one BOS), and the
chat prompts exit tuning continues by default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError

# User turns for exit tuning on a chat model's own answers, besides exitwise.lm.data.DEFAULT_PROMPTS
# (disjoint from the benchmark's and the calibration's prompts in exitwise.lm.prompts).
CHAT_TUNING_PROMPTS: tuple[str, ...] = (
    "How do solar panels generate electricity?",
    "Write a short motivational message for a student before an exam.",
    "What is the difference between a list and a tuple in Python?",
    "Explain how a credit score works.",
    "Give me three ideas for a healthy breakfast.",
    "Why do cats purr?",
    "Describe the rules of chess in a few sentences.",
    "What is machine learning?",
    "How do I start learning to play the guitar?",
    "Summarize the causes of the French Revolution.",
    "What are black holes?",
    "Write a friendly reminder email about a library book that is overdue.",
    "How does the immune system fight infections?",
    "What is the best way to learn new vocabulary?",
    "Explain what an API is.",
    "Give me a packing list for a beach holiday.",
    "Why is biodiversity important?",
    "How do I make pancakes?",
    "What is the difference between HTTP and HTTPS?",
    "Write a four-line poem about rain.",
    "How can I reduce stress at work?",
    "What happened during the Industrial Revolution?",
    "Explain compound interest with an example.",
    "What are the planets of the solar system?",
    "How do I write a good cover letter?",
    "What is the role of mitochondria?",
    "Suggest a weekend itinerary for a city trip.",
    "How do electric cars work?",
    "What is a sonnet?",
    "Explain the difference between RAM and storage.",
    "Why do birds migrate?",
    "How do I care for a houseplant?",
    "What is the greenhouse effect?",
    "Write a short dialogue between a customer and a waiter.",
    "What are the main parts of a computer?",
    "How do I calculate the area of a circle?",
    "What is the history of the Olympic Games?",
    "Give three tips for writing clear emails.",
    "What is a healthy amount of sleep for adults?",
    "Explain how a search engine works.",
)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _uses_chat(tokenizer: Any, chat: bool | None) -> bool:
    use_chat = has_chat_template(tokenizer) if chat is None else chat
    if use_chat and not has_chat_template(tokenizer):
        raise ConfigError("chat=True, but this tokenizer has no chat template")
    return use_chat


def format_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool | None = None) -> list[str]:
    """Prompts as the model should see them: wrapped in the chat template (one user turn +
    the assistant opening) when the tokenizer has one (``chat=None``) or when ``chat``."""
    if not _uses_chat(tokenizer, chat):
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def prompt_ids(tokenizer: Any, prompts: Sequence[str], chat: bool | None = None
               ) -> list[list[int]]:
    """Prompts -> token ids as the model should see them (:func:`format_prompts`, then
    tokenized). A chat template writes the model's special tokens itself (its BOS where the
    model wants one), so templated text gets none added, as HF's
    ``apply_chat_template(tokenize=True)``; plain text gets the tokenizer's own (Llama's,
    Gemma's BOS), as ``tokenizer(text)``: otherwise a BOS model would see its prompts
    without one, or twice."""
    special = not _uses_chat(tokenizer, chat)
    return [tokenizer(t, add_special_tokens=special)["input_ids"]
            for t in format_prompts(tokenizer, prompts, chat)]


def prompt_batch(
    tokenizer: Any, prompts: Sequence[str], device: torch.device | str = "cpu",
    chat: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (user text, not yet formatted) -> left-padded (input_ids (B, T),
    attention_mask (B, T)), formatted and tokenized as :func:`prompt_ids`."""
    if not prompts:
        raise ConfigError("give at least one prompt")
    special = not _uses_chat(tokenizer, chat)
    tokenizer.padding_side = "left"
    enc = tokenizer(format_prompts(tokenizer, prompts, chat), return_tensors="pt",
                    padding=True, add_special_tokens=special)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


__all__ = ["CHAT_TUNING_PROMPTS", "format_prompts", "has_chat_template", "prompt_batch",
           "prompt_ids"]

"""Token data for training decoder LMs' exits (:func:`exitwise.lm.tune_exits`).

Three sources, one shape: a list of token-id lists (one per training sequence, each at most
``seq_len`` long and at least 2 tokens, so there is a next token to predict / a position to
distill):

- :func:`tokenize_texts`: user texts (strings with a tokenizer, or pre-tokenized id lists),
  each cut into ``seq_len`` windows;
- :func:`self_generated_sequences`: the model's own continuations of prompts (greedy via
  :func:`exitwise.generation.generate`, extra samples via the HF model's sampler), cached as
  JSON in ``output_dir`` so a rerun does not regenerate;
- :func:`batch_at_step`: the right-padded batch of a given step, a pure function of
  (seed, step), so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import weights_fingerprint
from ..errors import ConfigError, DataError
from ..generation import generate

SELF_GEN_CACHE = "self_generated.json"

# Diverse openings (prose, code, dialogue, lists, math, instructions), for self-distillation
# data when the user gives no texts.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Q: What is the capital of France?\nA:",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about photosynthesis are",
    "import numpy as np\n\n# compute the mean of each row\n",
    "Dear hiring manager,\n\nI am writing to apply for",
    "Step 1: Preheat the oven to 180 degrees.\nStep 2:",
    "The theorem states that for every prime number p,",
    "User: Can you recommend a good book about astronomy?\nAssistant:",
    "In 1969, the Apollo 11 mission",
    "SELECT name, email FROM users WHERE",
    "Climate change affects ocean currents by",
    "Here is a short poem about autumn:\n",
    "The main differences between TCP and UDP are",
    "To solve 3x + 7 = 22, we first",
    "Breaking news: scientists have discovered",
    "A good password should",
    "<html>\n<head>\n<title>",
    "The quick brown fox",
)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one string: HF tokenizers (``__call__`` -> {"input_ids"}) or ``encode``."""
    if callable(tokenizer):
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} is neither callable nor has encode"
        )
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    return [int(i) for i in ids]


def _as_id_list(item: Any, index: int, vocab_size: int) -> list[int]:
    if isinstance(item, torch.Tensor):
        item = item.flatten().tolist()
    if not isinstance(item, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in item
    ):
        raise DataError(
            f"texts[{index}] must be a string (with a tokenizer) or a list of token ids; "
            f"got {type(item).__name__}"
        )
    bad = [i for i in item if not 0 <= i < vocab_size]
    if bad:
        raise DataError(f"texts[{index}] has token ids outside [0, {vocab_size}): {bad[:5]}")
    return list(item)


def tokenize_texts(
    texts: Sequence[Any], tokenizer: Any, seq_len: int, vocab_size: int
) -> list[list[int]]:
    """Strings (need ``tokenizer``) or id lists -> windows of at most ``seq_len`` ids, each >= 2
    tokens (shorter remainders are dropped: nothing to predict)."""
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or len(texts) == 0:
        raise DataError("the training texts are empty: give at least one (the ce, kl and calm "
                        "objectives also self-generate them from data=None; layerskip and free "
                        "need text)")
    out: list[list[int]] = []
    for n, item in enumerate(texts):
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError("texts are strings: give the tokenizer (or token-id lists)")
            ids = _as_id_list(_encode(tokenizer, item), n, vocab_size)
        else:
            ids = _as_id_list(item, n, vocab_size)
        for start in range(0, len(ids), seq_len):
            window = ids[start : start + seq_len]
            if len(window) >= 2:
                out.append(window)
    if not out:
        raise DataError(
            "texts gave no sequence of at least 2 tokens (all empty or single-token)"
        )
    return out


def split_holdout(
    seqs: list[list[int]], fraction: float, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(train, held-out): a seeded ``fraction`` (at least one, at most half) held out; with a
    single sequence both are that sequence."""
    if len(seqs) < 2:
        return seqs, seqs
    n_eval = min(max(1, round(fraction * len(seqs))), len(seqs) // 2)
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed + 7)).tolist()
    held = set(perm[:n_eval])
    return [s for i, s in enumerate(seqs) if i not in held], [seqs[i] for i in sorted(held)]


def data_digest(seqs: Sequence[Any]) -> str:
    """A short hash of training data (token-id lists, or (prompt, answer) pairs): a resumed
    run must see the data its checkpoint was trained on."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(json.dumps([list(map(list, s)) if s and isinstance(s[0], (list, tuple)) else
                         list(s) for s in seqs]).encode())
    return h.hexdigest()[:16]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention_mask, both (B, max_len)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def derived_seed(seed: int, index: int) -> int:
    """A reproducible seed for stream ``index`` (an epoch, a step) of a run seeded ``seed``:
    ``seed * P + index`` with the prime P = 1_000_003, larger than any index used, so distinct
    (seed, index) pairs give distinct seeds."""
    return seed * 1_000_003 + index


def cut_at_eos(ids: Sequence[int], eos: set[int]) -> list[int]:
    """``ids`` up to and including the first EOS id (all of them without one)."""
    out: list[int] = []
    for tok in ids:
        out.append(int(tok))
        if tok in eos:
            break
    return out


def batch_at_step(
    seqs: list[list[int]], step: int, batch_size: int, seed: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of training step ``step`` (0-based): epoch-wise seeded shuffles, so it
    depends only on (seed, step) and resuming replays nothing and skips nothing."""
    per_epoch = -(-len(seqs) // batch_size)
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(derived_seed(seed, epoch))
    order = torch.randperm(len(seqs), generator=g).tolist()
    return pad_batch([seqs[i] for i in order[j * batch_size : (j + 1) * batch_size]], pad_id)


# -- self-generated data -------------------------------------------------------------------
def _prompt_ids(prompts: Sequence[Any], tokenizer: Any, vocab_size: int) -> list[list[int]]:
    out = []
    for n, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError(
                    "self-generation from text prompts needs the tokenizer (or give "
                    "self_generate_prompts as token-id lists)"
                )
            ids = _as_id_list(_encode(tokenizer, p), n, vocab_size)
        else:
            ids = _as_id_list(p, n, vocab_size)
        if not ids:
            raise DataError(f"self_generate_prompts[{n}] is empty")
        out.append(ids)
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, t - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, t - len(p) :] = 1
    return ids, mask


def generate_sequences(
    model: Any, prompts: list[list[int]], num_generations: int, gen_tokens: int, seed: int,
    pad_id: int, eos: set[int], batch_size: int = 8,
) -> list[list[int]]:
    """Prompt + continuation ids: generation 0 of each prompt is greedy (exitwise's own
    decoder); generations 1.. are sampled (temperature 1, top-p 0.95) by the HF model."""
    lm = model.backbone.model
    device = model.backbone.lm_head.weight.device
    out: list[list[int]] = []
    for g in range(num_generations):
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            ids, mask = left_pad(chunk, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            if g == 0:
                seqs = generate(
                    model.backbone, ids, mask, max_new_tokens=gen_tokens, pad_token_id=pad_id,
                    eos_token_id=sorted(eos) or None,
                ).sequences
            else:
                with torch.random.fork_rng(devices=[]), torch.inference_mode():
                    torch.manual_seed(seed * 7919 + g * 104_729 + s)
                    seqs = lm.generate(
                        input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.95,
                        temperature=1.0, top_k=0, max_new_tokens=gen_tokens,
                        pad_token_id=pad_id, eos_token_id=sorted(eos) or None,
                    )
            new = seqs[:, ids.shape[1]:].tolist()
            out.extend(list(p) + cut_at_eos(row, eos) for p, row in zip(chunk, new))
    return out


def weights_checksum(module: torch.nn.Module) -> str:
    """A cheap summary of a model's weights (every parameter's strided float64 sum, 12
    significant digits): two models of one architecture with other weights (another
    checkpoint, a decoder tuned in memory) get different cache keys. The weighted sum of
    :func:`exitwise.checkpoint.weights_fingerprint`, as a string (so existing keys hold)."""
    return f"{weights_fingerprint(module)[0]:.12g}"


def self_generated_sequences(
    model: Any, tokenizer: Any, prompts: Sequence[Any] | None, num_generations: int,
    gen_tokens: int, seed: int, pad_id: int, eos: set[int], output_dir: str | Path | None,
) -> tuple[list[list[int]], bool]:
    """(sequences, reused_cache). The cache (``output_dir/self_generated.json``) is reused only
    when it was made from the same prompt ids, counts, seed and model description."""
    vocab = model.backbone.vocab_size
    prompt_ids = _prompt_ids(list(prompts) if prompts else list(DEFAULT_PROMPTS), tokenizer, vocab)
    key = {
        "prompts": prompt_ids, "num_generations": num_generations, "gen_tokens": gen_tokens,
        "seed": seed, "model": model.backbone.describe(),
        "weights": weights_checksum(model.backbone),  # the same path may hold other weights
    }
    path = Path(output_dir) / SELF_GEN_CACHE if output_dir is not None else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except json.JSONDecodeError:
            cached = None
        have = cached.get("key") if isinstance(cached, dict) else None
        if isinstance(have, dict) and "weights" not in have:  # written before it was keyed
            have = {**have, "weights": key["weights"]}
        if cached and have == key:
            return [list(map(int, s)) for s in cached["sequences"]], True
    seqs = generate_sequences(model, prompt_ids, num_generations, gen_tokens, seed, pad_id, eos)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"key": key, "sequences": seqs}))
        os.replace(tmp, path)
    return seqs, False

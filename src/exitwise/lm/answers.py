"""The model's own greedy answers: the training data of drafts that the full model accepts.

    answers = generate_answers(model, prompt_ids, max_new_tokens=128, cache="answers.json")
    ew.tune_exits(model, answers, ew.lm.AnswersConfig(epochs=3))

Self-speculative decoding accepts a draft token exactly when it equals the full model's greedy
choice; on the model's own greedy answers that choice *is* the answer's next token. Answers are
generated in batches by exitwise's greedy decoder and cached in a JSON file rewritten after
every batch, so an interrupted run loses at most one batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..backbones import wrap_backbone
from ..backbones.special_tokens import eos_and_pad
from ..checkpoint import read_json, write_json_atomic
from ..errors import DataError
from ..generation import generate
from .data import cut_at_eos, left_pad, weights_checksum

Answer = tuple[list[int], list[int]]  # (prompt ids, the model's greedy answer ids)


def check_answers(answers: Sequence[Any], vocab_size: int) -> list[Answer]:
    """Validate ``[(prompt_ids, answer_ids), ...]``; returns them as lists of ints."""
    if answers is None or len(answers) == 0:
        raise DataError("no answers to tune on: give [(prompt_ids, answer_ids), ...]")
    out: list[Answer] = []
    for n, item in enumerate(answers):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"answers[{n}] must be a (prompt_ids, answer_ids) pair")
        prompt, answer = ([int(t) for t in part] for part in item)
        if not prompt or not answer:
            raise DataError(f"answers[{n}] has an empty prompt or an empty answer")
        bad = [t for t in prompt + answer if not 0 <= t < vocab_size]
        if bad:
            raise DataError(f"answers[{n}] has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append((prompt, answer))
    return out


ANSWERS_CACHE_VERSION = 1


def _read_answer_cache(path: Path | None, key: dict[str, Any]) -> list[Answer]:
    """Answers cached at ``path`` for the same key (model, its weights, budget), in prompt
    order. A cache written before the key held the weights' checksum matches on the rest."""
    cached = read_json(path) if path is not None else None
    have = cached.get("key") if cached else None
    if not isinstance(have, dict):
        return []
    if "weights" not in have:
        key = {k: v for k, v in key.items() if k != "weights"}
    if have != key:
        return []
    return [(list(map(int, p)), list(map(int, a))) for p, a in cached["items"]]


@torch.no_grad()
def generate_answers(
    model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
    batch_size: int = 16, eos_token_id: Any = None, pad_token_id: int | None = None,
    cache: str | Path | None = None, progress: bool = True,
) -> list[Answer]:
    """The model's greedy answer to each prompt (token-id lists), batched, EOS included.

    cache: a JSON file; answers already there for the same leading prompts (and the same
        model, weights and ``max_new_tokens``) are reused, and the file is rewritten
        atomically after every batch, so an interrupted run loses at most one batch and a
        longer prompt list extends a shorter one.
    """
    backbone = model.backbone if hasattr(model, "backbone") else model
    if not hasattr(backbone, "describe"):  # a plain Hugging Face causal LM
        backbone = wrap_backbone(backbone)
    device = backbone.lm_head.weight.device
    eos, pad = eos_and_pad(backbone, eos_token_id, pad_token_id)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise DataError("give at least one prompt, none empty")
    path = Path(cache) if cache is not None else None
    key = {"version": ANSWERS_CACHE_VERSION, "model": backbone.describe(),
           "max_new_tokens": max_new_tokens, "eos": sorted(eos)}
    if path is not None:
        key["weights"] = weights_checksum(backbone)
    out: list[Answer] = []
    for (p, a), want in zip(_read_answer_cache(path, key), prompts):
        if p != want:
            break
        out.append((p, a))
    bar = tqdm(total=len(prompts), initial=len(out), desc="greedy answers", leave=False,
               disable=not progress)
    for s in range(len(out), len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        ids, mask = left_pad(chunk, pad)
        seqs = generate(
            backbone, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos) or None, pad_token_id=pad,
        ).sequences.cpu()
        for p, row in zip(chunk, seqs[:, ids.shape[1]:].tolist()):
            out.append((p, cut_at_eos(row, eos)))
        if path is not None:
            write_json_atomic(path, {"key": key, "items": out}, indent=None)
        bar.update(len(chunk))
    bar.close()
    return out[: len(prompts)]


def answer_token_ranking(answers: Sequence[Answer], vocab_size: int) -> torch.Tensor:
    """(V,) token ids, most frequent answer token first (prompt-token counts break ties, then
    the id): the draft vocabulary for drafting such answers."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    prompt_counts = torch.zeros(vocab_size, dtype=torch.float64)
    for prompt, answer in answers:
        counts.index_add_(0, torch.tensor(answer), torch.ones(len(answer), dtype=torch.float64))
        prompt_counts.index_add_(
            0, torch.tensor(prompt), torch.ones(len(prompt), dtype=torch.float64)
        )
    score = counts + prompt_counts / (1.0 + prompt_counts.max())  # < 1: only breaks ties
    return torch.argsort(score, descending=True, stable=True)

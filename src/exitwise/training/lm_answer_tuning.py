"""Exit tuning on the model's own greedy answers, from cached features (frozen backbone).

    answers = generate_answers(model, prompt_ids, max_new_tokens=128)  # [(prompt, answer)]
    result = tune_exits_on_answers(model, answers, epochs=3, output_dir="runs/ee")
    result.agreement_after   # {6: 0.45}: held-out share of answer tokens the exit drafts right

Self-speculative decoding accepts a draft token exactly when it equals the full model's greedy
choice. On the model's own greedy answers that choice *is* the next token of the answer, so
cross-entropy on the answer tokens trains the acceptance objective directly, with no teacher
logits to compute or store (KL to the final layer, :func:`~.lm_tuning.tune_exits`, needs the
whole model on every batch). And since the backbone is frozen, the hidden states an exit reads
never change: they are computed once, only up to the deepest tuned exit (6 of 30 blocks costs
a fifth of one forward pass over the data), kept in memory, and the heads then train for as
many epochs as wanted at the cost of the heads alone. That is what lets a CPU tune on
thousands of answers instead of a few dozen.

Loss positions: only those whose next token the model chose (the answer), never the prompt's
own text. Agreement is measured the same way on held-out answers: it is the expected draft
acceptance of one-token drafts on such answers.

Checkpoints (``output_dir/lm_tuning/``, the same files as :func:`~.lm_tuning.tune_exits`)
every ``save_every`` steps; a rerun resumes from the last one, on the same batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from .lm_data import split_holdout
from .lm_tuning import (
    CKPT_DIR,
    LMTuningResult,
    load_checkpoint,
    only_training,
    record_step,
    tuned_exits,
)

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
    """Answers cached at ``path`` for the same key (model, budget), in prompt order."""
    from .checkpoint import read_json

    cached = read_json(path) if path is not None else None
    if not cached or cached.get("key") != key:
        return []
    return [(list(map(int, p)), list(map(int, a))) for p, a in cached["items"]]


@torch.no_grad()
def generate_answers(
    model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
    batch_size: int = 16, eos_token_id: Any = None, pad_token_id: int | None = None,
    cache: str | Path | None = None, progress: bool = True,
) -> list[Answer]:
    """The model's greedy answer to each prompt (token-id lists), batched, EOS included.

    cache: a JSON file; answers already there for the same leading prompts (and the same
        model and ``max_new_tokens``) are reused, and the file is rewritten atomically after
        every batch, so an interrupted run loses at most one batch and a longer prompt list
        extends a shorter one.
    """
    from ..backbones.special_tokens import eos_and_pad
    from ..generation import generate
    from .checkpoint import write_json_atomic
    from .lm_data import left_pad

    backbone = model.backbone if hasattr(model, "backbone") else model
    device = backbone.lm_head.weight.device
    eos, pad = eos_and_pad(backbone, eos_token_id, pad_token_id)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise DataError("give at least one prompt, none empty")
    path = Path(cache) if cache is not None else None
    key = {"version": ANSWERS_CACHE_VERSION, "model": backbone.describe(),
           "max_new_tokens": max_new_tokens, "eos": sorted(eos)}
    out: list[Answer] = []
    for (p, a), want in zip(_read_answer_cache(path, key), prompts):
        if p != want:
            break
        out.append((p, a))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), initial=len(out), desc="greedy answers", leave=False)
    for s in range(len(out), len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        ids, mask = left_pad(chunk, pad)
        seqs = generate(
            backbone, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos) or None, pad_token_id=pad,
        ).sequences.cpu()
        for r, p in enumerate(chunk):
            new: list[int] = []
            for tok in seqs[r, ids.shape[1]:].tolist():
                new.append(int(tok))
                if tok in eos:
                    break
            out.append((p, new))
        if path is not None:
            write_json_atomic(path, {"key": key, "items": out}, indent=None)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
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


@torch.no_grad()
def exit_features(
    model: Any, ks: list[int], answers: Sequence[Answer], batch_size: int = 16,
    progress: bool = True,
) -> list[list[torch.Tensor]]:
    """Per tuned exit j, per answer i: the hidden state (T_i, H) after ``exit_layers[ks[j]]``
    blocks at every real token of prompt + answer (the frozen backbone, run once, only up to
    the deepest of these exits)."""
    from .lm_data import pad_batch

    backbone = model.backbone
    device = backbone.lm_head.weight.device
    depths = [model.exit_layers[k] for k in ks]
    deepest = max(depths)
    feats: list[list[torch.Tensor]] = [[] for _ in ks]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(answers), desc=f"features to layer {deepest}", leave=False)
    for s in range(0, len(answers), batch_size):
        seqs = [p + a for p, a in answers[s : s + batch_size]]
        ids, mask = pad_batch(seqs, 0)
        state = backbone.start(input_ids=ids.to(device), attention_mask=mask.to(device))
        for i in range(deepest):
            state = backbone.step(i, state)
            for j, d in enumerate(depths):
                if d == i + 1:
                    hidden, _ = backbone.features(state)
                    for r, seq in enumerate(seqs):
                        feats[j].append(hidden[r, : len(seq)].detach().cpu().clone())
        if bar is not None:
            bar.update(len(seqs))
    if bar is not None:
        bar.close()
    return feats


def _targets(answers: Sequence[Answer], index: list[int], where: torch.Tensor | None,
             width: int) -> torch.Tensor:
    """(B, width) long: at position t the answer token at t + 1 (in the head's draft-vocabulary
    index when ``where`` maps ids to it), -100 elsewhere (prompt text, padding, tokens outside
    the draft vocabulary)."""
    out = torch.full((len(index), width), -100, dtype=torch.long)
    for r, i in enumerate(index):
        prompt, answer = answers[i]
        start = len(prompt) - 1  # the last prompt position predicts the first answer token
        tgt = torch.tensor(answer, dtype=torch.long)
        out[r, start : start + len(answer)] = tgt if where is None else where[tgt]
    return out


def _batch(
    feats: list[torch.Tensor], index: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded hidden (B, T, H) and mask (B, T) of the answers ``index``."""
    t = max(feats[i].shape[0] for i in index)
    h = feats[index[0]].shape[1]
    hidden = torch.zeros(len(index), t, h, dtype=feats[index[0]].dtype)
    mask = torch.zeros(len(index), t, dtype=torch.long)
    for r, i in enumerate(index):
        n = feats[i].shape[0]
        hidden[r, :n] = feats[i]
        mask[r, :n] = 1
    return hidden, mask


def _head_logits(head: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, K) compact logits of ``head`` at every position (a block adapter attends
    causally over the real tokens, as in generation)."""
    from ..backbones.hf_decoder import DecodeContext, prompt_positions

    ctx = DecodeContext(None, prompt_positions(mask), mask)
    return head.compact_logits(hidden, ctx)


def _where(head: Any, vocab_size: int) -> torch.Tensor | None:
    ids = getattr(head, "vocab_ids", None)
    if ids is None:
        return None
    where = torch.full((vocab_size,), -100, dtype=torch.long)
    where[ids.cpu()] = torch.arange(ids.numel())
    return where


@torch.no_grad()
def answer_agreement(
    model: Any, ks: list[int], feats: list[list[torch.Tensor]], answers: Sequence[Answer],
    index: list[int], batch_size: int = 16,
) -> list[float]:
    """Per tuned exit: share of the answer tokens of ``answers[index]`` (all of them, also those
    outside a draft vocabulary) that the exit's top-1 token predicts."""
    device = model.backbone.lm_head.weight.device
    hits = [0] * len(ks)
    total = 0
    for s in range(0, len(index), batch_size):
        part = index[s : s + batch_size]
        tgt = _targets(answers, part, None, max(feats[0][i].shape[0] for i in part))
        real = tgt >= 0
        total += int(real.sum())
        for j, k in enumerate(ks):
            head = model.heads[k]
            hidden, mask = _batch(feats[j], part)
            logits = _head_logits(head, hidden.to(device), mask.to(device))
            top = head.compact_argmax(logits).cpu()
            hits[j] += int((top[real] == tgt[real]).sum())
    return [h / max(total, 1) for h in hits]


def tune_exits_on_answers(
    model: Any,
    answers: Sequence[Any],
    *,
    epochs: float = 3.0,
    lr: float = 1e-3,
    batch_size: int = 16,
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    eval_fraction: float = 0.05,
    output_dir: str | Path | None = None,
    save_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> LMTuningResult:
    """Tune the intermediate ``lm`` exits of ``model`` on ``answers`` (see module doc).

    answers: ``[(prompt_ids, answer_ids), ...]``, each answer the model's own greedy
        continuation of its prompt (e.g. from :func:`generate_answers`).
    epochs: passes over the training answers (fractions allowed); steps = ceil(epochs x
        answers / batch_size).
    lr: AdamW learning rate after ``warmup_steps`` linear warmup, then cosine decay to 10%.
    eval_fraction: share of answers held out for the agreement before / after.
    Heads built with ``draft_vocab=K`` get the K most frequent answer tokens first.
    """
    ks = tuned_exits(model)
    backbone = model.backbone
    vocab = backbone.vocab_size
    answers = check_answers(answers, vocab)
    if not isinstance(epochs, (int, float)) or not epochs > 0:
        raise ConfigError(f"epochs must be a positive number; got {epochs!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr must be a positive number; got {lr!r}")
    for name, v in (("batch_size", batch_size), ("save_every", save_every)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive int; got {v!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}")
    depths = [model.exit_layers[k] for k in ks]
    device = backbone.lm_head.weight.device
    order = list(range(len(answers)))
    train_idx, eval_idx = split_holdout(order, eval_fraction, seed)  # type: ignore[arg-type]
    train_idx, eval_idx = [int(i) for i in train_idx], [int(i) for i in eval_idx]
    steps = max(1, -(-int(epochs * len(train_idx)) // batch_size))

    params = [p for k in ks for p in model.heads[k].parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    folder = Path(output_dir) / CKPT_DIR if output_dir is not None else None
    with only_training(model, params):
        model.eval()
        state = load_checkpoint(folder, model, ks, optimizer, depths) if (
            folder is not None and resume) else None
        if state is None:
            ranked = answer_token_ranking([answers[i] for i in train_idx], vocab)
            for k in ks:
                size = getattr(model.heads[k], "draft_vocab", None)
                if size:
                    model.heads[k].set_draft_vocab(ranked[:size])
        feats = exit_features(model, ks, answers, batch_size, progress)
        if state is None:
            before = answer_agreement(model, ks, feats, answers, eval_idx, batch_size)
            state = {"exit_layers": depths, "step": 0, "loss_history": [],
                     "exit_loss_history": [[] for _ in ks], "agreement_before": before,
                     "loss": "ce_on_greedy_answers", "seed": seed, "steps": steps}
        wheres = [_where(model.heads[k], vocab) for k in ks]
        start = int(state["step"])
        per_epoch = -(-len(train_idx) // batch_size)
        bar = None
        if progress and start < steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc="tune exits on answers", leave=False)
        for step in range(start, steps):
            epoch, j = divmod(step, per_epoch)  # seeded per-epoch shuffles: resume-exact
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(len(train_idx), generator=g).tolist()
            part = [train_idx[i] for i in perm[j * batch_size : (j + 1) * batch_size]]
            if warmup_steps and step < warmup_steps:
                scale = (step + 1) / warmup_steps
            else:
                done = (step - warmup_steps) / max(1, steps - warmup_steps)
                scale = 0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * done)).item())
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            losses = []
            for jx, k in enumerate(ks):
                head = model.heads[k]
                head.train()
                hidden, mask = _batch(feats[jx], part)
                tgt = _targets(answers, part, wheres[jx], hidden.shape[1]).to(device)
                logits = _head_logits(head, hidden.to(device), mask.to(device))
                if bool((tgt >= 0).any()):
                    losses.append(F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(),
                                                  ignore_index=-100))
                else:
                    losses.append(logits.sum() * 0.0)
            total = torch.stack(losses).mean()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            record_step(state, step, float(total.detach()), [float(v.detach()) for v in losses],
                        bar, folder, save_every, steps, model, ks, optimizer)
        if bar is not None:
            bar.close()
        model.eval()
        after = answer_agreement(model, ks, feats, answers, eval_idx, batch_size)
    return LMTuningResult(
        exit_layers=depths, steps=int(state["step"]), start_step=start,
        loss="ce_on_greedy_answers", loss_history=list(state["loss_history"]),
        exit_loss_history={d: list(h) for d, h in zip(depths, state["exit_loss_history"])},
        agreement_before=dict(zip(depths, state["agreement_before"])),
        agreement_after=dict(zip(depths, after)),
        num_train_sequences=len(train_idx), num_eval_sequences=len(eval_idx),
        self_generated=True, output_dir=str(output_dir) if output_dir is not None else None,
    )

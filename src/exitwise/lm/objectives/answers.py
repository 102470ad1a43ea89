"""Exit heads trained on the model's own greedy answers, from cached features ("answers").

    answers = ew.generate_answers(model, prompt_ids, max_new_tokens=128)
    result = ew.tune_exits(model, answers, ew.lm.AnswersConfig(epochs=3))
    result.after        # {6: 0.45}: held-out share of answer tokens the exit drafts right

Self-speculative decoding accepts a draft token exactly when it equals the full model's greedy
choice; on the model's own greedy answers that choice *is* the answer's next token, so the
cross-entropy on the answer tokens (:func:`answer_ce`) trains the acceptance objective
directly, with no teacher logits. The backbone is frozen, so the hidden states an exit reads
never change: they are computed once, only up to the deepest tuned exit, kept in memory, and
the heads then train for as many epochs as wanted at the cost of the heads alone.

Loss positions: those whose next token the model chose (the answer), never the prompt's own
text. Agreement is measured the same way on held-out answers: the expected acceptance of
one-token drafts. Heads built with ``draft_vocab=K`` read out the K most frequent answer
tokens (counted on the training answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...backbones.hf_decoder import DecodeContext, prompt_positions
from ...errors import ConfigError
from ..answers import Answer, answer_token_ranking, check_answers
from ..data import data_digest, derived_seed, pad_batch, split_holdout
from ..exits import tuned_exits, vocab_positions
from ..loop import Task
from .base import ObjectiveConfig, Prepared, is_number, register_objective


# -- the loss (pure) -----------------------------------------------------------------------
def answer_targets(answers: Sequence[Answer], index: list[int], width: int,
                   where: torch.Tensor | None = None) -> torch.Tensor:
    """(B, width) long: at position t the answer token at t + 1 (its index in a draft
    vocabulary when ``where`` maps ids to it), -100 elsewhere (prompt text, padding, tokens
    outside the draft vocabulary). The last prompt position predicts the first answer token."""
    out = torch.full((len(index), width), -100, dtype=torch.long)
    for r, i in enumerate(index):
        prompt, answer = answers[i]
        start = len(prompt) - 1
        tgt = torch.tensor(answer, dtype=torch.long)
        out[r, start : start + len(answer)] = tgt if where is None else where[tgt]
    return out


def answer_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (float32) of logits (B, T, K) on targets (B, T) (-100 ignored); a zero
    that keeps the graph when no target is inside."""
    if not bool((targets >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


# -- cached features -----------------------------------------------------------------------
@torch.no_grad()
def exit_features(model: Any, ks: list[int], answers: Sequence[Answer], batch_size: int = 16,
                  progress: bool = True) -> list[list[torch.Tensor]]:
    """Per exit j in ``ks``, per answer i: the hidden state (T_i, H) after that exit's block at
    every real token of prompt + answer (the frozen backbone, run once, only up to the
    deepest of these exits)."""
    backbone = model.backbone
    device = backbone.lm_head.weight.device
    depths = [model.exit_layers[k] for k in ks]
    deepest = max(depths)
    feats: list[list[torch.Tensor]] = [[] for _ in ks]
    bar = tqdm(total=len(answers), desc=f"features to layer {deepest}", leave=False,
               disable=not progress)
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
        bar.update(len(seqs))
    bar.close()
    return feats


def stack_features(feats: list[torch.Tensor],
                   index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded hidden (B, T, H) and mask (B, T) of the answers ``index``."""
    t = max(feats[i].shape[0] for i in index)
    hidden = torch.zeros(len(index), t, feats[index[0]].shape[1], dtype=feats[index[0]].dtype)
    mask = torch.zeros(len(index), t, dtype=torch.long)
    for r, i in enumerate(index):
        n = feats[i].shape[0]
        hidden[r, :n] = feats[i]
        mask[r, :n] = 1
    return hidden, mask


def head_logits(head: Any, hidden: torch.Tensor, mask: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, K) compact logits of ``head`` at every position (a block adapter attends
    causally over the real tokens, as in generation); ``condition`` (B, T, H): what a
    feature-conditioned head reads at each position."""
    ctx = DecodeContext(None, prompt_positions(mask), mask)
    if condition is None:
        return head.compact_logits(hidden, ctx)
    return head.compact_logits(hidden, ctx, condition)


def previous_final(final: torch.Tensor, drop: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The condition of a feature-conditioned exit: at position t the final hidden state at
    t - 1 (zeros at t = 0), (B, T, H) -> (B, T, H); each position's condition is zeroed with
    probability ``drop`` (so the head also learns to draft without one)."""
    cond = torch.zeros_like(final)
    cond[:, 1:] = final[:, :-1]
    if drop > 0:
        keep = torch.rand(cond.shape[:2], generator=generator) >= drop
        cond = cond * keep[..., None].to(cond.dtype)
    return cond


@torch.no_grad()
def answer_agreement(model: Any, ks: list[int], feats: list[list[torch.Tensor]],
                     final: list[torch.Tensor] | None, answers: Sequence[Answer],
                     index: list[int], batch_size: int = 16) -> list[float]:
    """Per exit ``ks[j]`` (features ``feats[j]``, :func:`exit_features`): the share of the
    answer tokens of answers ``index`` that its top draft equals -- the expected acceptance
    of one-token drafts. ``final``: the final layer's features, read by feature-conditioned
    exits (the state at the previous position)."""
    device = model.backbone.lm_head.weight.device
    conditioned = [bool(getattr(model.heads[k], "conditioned", False)) for k in ks]
    if any(conditioned) and final is None:
        raise ConfigError("a feature-conditioned exit needs the final features")
    hits, total = [0] * len(ks), 0
    for s in range(0, len(index), batch_size):
        part = index[s : s + batch_size]
        tgt = answer_targets(answers, part, max(feats[0][i].shape[0] for i in part))
        real = tgt >= 0
        total += int(real.sum())
        # what conditioned exits read, once per batch whatever their number
        prev = previous_final(stack_features(final, part)[0]).to(device) if any(
            conditioned) else None
        for j, k in enumerate(ks):
            head = model.heads[k]
            hidden, mask = stack_features(feats[j], part)
            cond = prev if conditioned[j] else None
            top = head.compact_argmax(
                head_logits(head, hidden.to(device), mask.to(device), cond)).cpu()
            hits[j] += int((top[real] == tgt[real]).sum())
    return [h / max(total, 1) for h in hits]


def agreement_on_answers(model: Any, answers: Sequence[Answer], batch_size: int = 16,
                         progress: bool = True) -> dict[int, float]:
    """{exit depth: :func:`answer_agreement` on all of ``answers``} for a model's tuned
    ``lm`` exits (features computed here, up to the deepest exit, or every layer when an
    exit is feature-conditioned); e.g. two drafters compared on the same held-out answers."""
    ks = tuned_exits(model)
    answers = check_answers(answers, model.backbone.vocab_size)
    conditioned = any(getattr(model.heads[k], "conditioned", False) for k in ks)
    last = len(model.exit_layers) - 1
    feats = exit_features(model, ks + [last] if conditioned else ks, answers, batch_size,
                          progress)
    final = feats.pop() if conditioned else None
    got = answer_agreement(model, ks, feats, final, answers, list(range(len(answers))),
                           batch_size)
    return {int(model.exit_layers[k]): a for k, a in zip(ks, got)}


# -- the config ----------------------------------------------------------------------------
@register_objective("answers")
@dataclass
class AnswersConfig(ObjectiveConfig):
    """Cross-entropy on the model's own greedy answers (``data``: ``[(prompt_ids,
    answer_ids), ...]``, e.g. from :func:`exitwise.generate_answers`), backbone frozen.

    epochs: passes over the training answers (fractions allowed); steps = ceil(epochs x
    answers / batch_size). Warmup, then cosine decay to ``min_lr_ratio`` x lr.
    condition_dropout: for feature-conditioned heads (``conditioned=True``), the share of
    positions trained without the previous position's final state (see
    :class:`~exitwise.heads.lm.LMHead`); their features then run through every block once.
    """

    epochs: float = 3.0
    lr: float = 1e-3
    batch_size: int = 16
    warmup_steps: int = 20
    schedule: str = "cosine"
    eval_fraction: float = 0.05
    condition_dropout: float = 0.25

    def validate(self) -> None:
        super().validate()
        if not is_number(self.epochs) or self.epochs <= 0:
            raise ConfigError(f"epochs must be a positive number; got {self.epochs!r}")
        if not is_number(self.condition_dropout) or not 0 <= self.condition_dropout < 1:
            raise ConfigError(
                f"condition_dropout must be in [0, 1); got {self.condition_dropout!r}")

    def build(self, model: Any, data: Any, tokenizer: Any, output_dir: Any,
              progress: bool = True) -> Prepared:
        ks = tuned_exits(model)
        backbone = model.backbone
        vocab = backbone.vocab_size
        answers = check_answers(data, vocab)
        depths = [model.exit_layers[k] for k in ks]
        device = backbone.lm_head.weight.device
        train_idx, eval_idx = split_holdout(list(range(len(answers))),  # type: ignore[arg-type]
                                            self.eval_fraction, self.seed)
        train_idx, eval_idx = [int(i) for i in train_idx], [int(i) for i in eval_idx]
        steps = max(1, -(-int(self.epochs * len(train_idx)) // self.batch_size))
        per_epoch = -(-len(train_idx) // self.batch_size)
        conditioned = [bool(getattr(model.heads[k], "conditioned", False)) for k in ks]
        last = len(model.exit_layers) - 1  # the final layer: conditioned heads read its states
        feats = exit_features(model, ks + [last] if any(conditioned) else ks, answers,
                              self.batch_size, progress)
        final = feats.pop() if any(conditioned) else None
        bs = self.batch_size

        def condition_of(jx: int, part: list[int], drop: float, step: int) -> torch.Tensor | None:
            if not conditioned[jx]:
                return None
            hidden, _ = stack_features(final, part)
            g = torch.Generator().manual_seed(derived_seed(self.seed, 10_000_019 + step))
            return previous_final(hidden, drop, g).to(device)

        def setup() -> None:
            ranked = answer_token_ranking([answers[i] for i in train_idx], vocab)
            for k in ks:
                size = getattr(model.heads[k], "draft_vocab", None)
                if size:
                    model.heads[k].set_draft_vocab(ranked[:size])

        wheres: dict[int, torch.Tensor | None] = {}

        def where_of(k: int) -> torch.Tensor | None:
            """Exit k's id -> draft-vocabulary position map, built once (the draft vocabulary
            is fixed by the first step: chosen by ``setup`` or loaded from a checkpoint)."""
            if k not in wheres:
                where = vocab_positions(getattr(model.heads[k], "vocab_ids", None), vocab)
                wheres[k] = None if where is None else where.cpu()
            return wheres[k]

        def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float | None]]:
            epoch, j = divmod(step, per_epoch)  # seeded per-epoch shuffles: resume-exact
            g = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            perm = torch.randperm(len(train_idx), generator=g).tolist()
            part = [train_idx[i] for i in perm[j * bs : (j + 1) * bs]]
            losses = []
            for jx, k in enumerate(ks):
                head = model.heads[k]
                hidden, mask = stack_features(feats[jx], part)
                tgt = answer_targets(answers, part, hidden.shape[1], where_of(k)).to(device)
                cond = condition_of(jx, part, self.condition_dropout, step)
                losses.append(answer_ce(
                    head_logits(head, hidden.to(device), mask.to(device), cond), tgt))
            total = torch.stack(losses).mean()
            return total, {str(d): float(v.detach()) for d, v in zip(depths, losses)}

        def evaluate() -> dict[str, float]:
            got = answer_agreement(model, ks, feats, final, answers, eval_idx, bs)
            return {str(d): a for d, a in zip(depths, got)}

        def train_mode() -> None:
            for k in ks:
                model.heads[k].train()

        task = Task(
            module=nn.ModuleDict({str(k): model.heads[k] for k in ks}),
            params=[p for k in ks for p in model.heads[k].parameters()], root=model,
            step_loss=step_loss, evaluate=evaluate, train_mode=train_mode, setup=setup,
            settings={"objective": self.registered_name, "exit_layers": depths,
                      "model": backbone.describe(), "batch_size": bs, "seed": self.seed,
                      "num_answers": len(answers),
                      **({"conditioned": conditioned,
                          "condition_dropout": float(self.condition_dropout)}
                         if any(conditioned) else {}),
                      "eval_fraction": float(self.eval_fraction),
                      "data": data_digest(answers)},
        )
        return Prepared(task=task, steps=steps, metric="agreement", num_train=len(train_idx),
                        num_eval=len(eval_idx), extras={"self_generated": True})

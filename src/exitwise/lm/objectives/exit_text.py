"""Exit heads on a frozen decoder LM, trained on text: EE-Tuning's cross-entropy ("ce") and
self-distillation to the final layer ("kl").

    model = ew.attach_exits(lm, ew.ExitConfig(layers=[6], head="lm", num_labels=vocab,
                                              head_kwargs={"adapter": "norm"},
                                              final_head_kwargs={}))
    result = ew.tune_exits(model, texts, ew.lm.ExitCEConfig(steps=500), tokenizer=tok)

Each batch runs the frozen backbone once (no grad) over right-padded sequences; after every
block that carries an exit, that exit's ``lm`` head turns the hidden states into logits at
all positions (with the backbone's context, so a ``block`` / ``kangaroo`` adapter attends
causally). Per exit, over real tokens:

- ``ce`` (:func:`exit_ce`): the cross-entropy of the exit on the text's next token, over real
  positions whose next token is real (EE-Tuning's objective);
- ``kl`` (:func:`exit_kl`): KL(p_final || p_exit), distillation to the model's own final
  layer; ``ExitKLConfig(ce_weight=1)`` adds the cross-entropy ("kl+ce");

and the exits' losses are averaged. An exit with a draft vocabulary of K ids is distilled
towards the final distribution restricted to those ids and renormalised (the best a K-way
draft can do), and its cross-entropy counts only targets inside the subset. Only the exit
heads' own pieces train; with no texts (``data=None``) the model's own continuations of
``prompts`` are the data (greedy first, then sampled; cached in ``output_dir``).

Reference: EE-Tuning's stage 2 in EE-LLM (pan-x-c/EE-LLM): each exit's loss is the LM
cross-entropy on the labels (``megatron/model/early_exit_gpt_model.py``,
``post_language_model_processing``), averaged over the loss mask (``pretrain_early_exit_gpt.py``,
``loss_func``), backbone frozen. Deviations: the exits' losses are averaged (EE-LLM sums them
with per-exit weights; equal weights give the same objective scaled by 1 / exits); EE-LLM's
confidence-weighted loss is not implemented; ``kl`` is an exitwise option, not EE-Tuning's;
the rate warms up to a constant (EE-LLM's scripts then decay it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.special_tokens import eos_and_pad
from ...errors import ConfigError
from ..data import (
    batch_at_step,
    data_digest,
    self_generated_sequences,
    split_holdout,
    tokenize_texts,
)
from ..draft_vocab import set_draft_vocabularies
from ..exits import (
    exit_and_final_logits,
    exit_vocab_ids,
    top1_agreement,
    tuned_exits,
    vocab_positions,
)
from ..loop import Task
from .base import ObjectiveConfig, Prepared, is_number, is_pos_int, register_objective


# -- the losses (pure) ---------------------------------------------------------------------
def next_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: real positions whose next token is real too (they have a target)."""
    real = mask.bool()
    return real[:, :-1] & real[:, 1:]


def exit_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            where: torch.Tensor | None = None) -> torch.Tensor | None:
    """Next-token cross-entropy of one exit, float32, over real positions with a real next
    token. logits (B, T, K); ids, mask (B, T); where: (V,) position of each id in a K-id
    draft vocabulary, -100 outside (None: K = V). None when no target is inside."""
    nxt = next_token_mask(mask)
    tgt = ids[:, 1:][nxt]
    if where is not None:
        tgt = where[tgt]
    if not bool((tgt >= 0).any()):
        return None
    return F.cross_entropy(logits.float()[:, :-1][nxt], tgt, ignore_index=-100)


def exit_kl(logits: torch.Tensor, final: torch.Tensor, mask: torch.Tensor,
            vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_final || p_exit) per real token, averaged, float32. logits (B, T, K), final
    (B, T, V); with ``vocab_ids`` (K,) the teacher is the final distribution restricted to
    those ids and renormalised."""
    real = mask.bool()
    teacher_logits = final.float()[real]
    if vocab_ids is not None:
        teacher_logits = teacher_logits[:, vocab_ids]
    teacher = F.log_softmax(teacher_logits, -1)
    student = F.log_softmax(logits.float()[real], -1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def exit_text_losses(
    exits: list[torch.Tensor], final: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
    kl_weight: float, ce_weight: float, vocab_ids: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """(num_exits,) per exit: ``kl_weight * exit_kl + ce_weight * exit_ce`` (a term with
    weight 0 is not computed)."""
    vocab = final.shape[-1]
    out = []
    for j, logits in enumerate(exits):
        sub = vocab_ids[j] if vocab_ids is not None else None
        total = logits.new_zeros((), dtype=torch.float32)
        if kl_weight:
            total = total + kl_weight * exit_kl(logits, final, mask, sub)
        if ce_weight:
            ce = exit_ce(logits, ids, mask, vocab_positions(sub, vocab))
            # no target inside the draft vocabulary in this batch: a zero that keeps the
            # graph, so the step is a no-op and not an error at backward()
            total = total + (ce_weight * ce if ce is not None else logits.float().sum() * 0.0)
        out.append(total)
    return torch.stack(out)


# -- the configs ---------------------------------------------------------------------------
@register_objective("ce")
@dataclass
class ExitCEConfig(ObjectiveConfig):
    """EE-Tuning: exit cross-entropy on text, backbone frozen (see the module docstring).

    steps: optimizer steps. seq_len: texts are cut into windows of this many tokens.
    prompts / num_generations / gen_tokens: with no texts, the model continues ``prompts``
    (default: built-in openings; strings need the tokenizer) ``num_generations`` times
    (the first greedy, the others sampled), ``gen_tokens`` new tokens each.
    """

    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    save_every: int = 50
    seq_len: int = 128
    prompts: Sequence[Any] | None = None
    num_generations: int = 1
    gen_tokens: int = 64
    kl_weight: ClassVar[float] = 0.0  # the loss's weights: fixed for "ce"
    ce_weight: ClassVar[float] = 1.0

    def validate(self) -> None:
        super().validate()
        for name in ("steps", "seq_len", "num_generations", "gen_tokens"):
            if not is_pos_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive int; got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a token and its successor); "
                              f"got {self.seq_len}")

    def build(self, model: Any, data: Any, tokenizer: Any, output_dir: Any,
              progress: bool = True) -> Prepared:
        return _build_text_exits(self, model, data, tokenizer, output_dir)


@register_objective("kl")
@dataclass
class ExitKLConfig(ExitCEConfig):
    """Distillation of each exit to the final layer, KL(p_final || p_exit), on text, backbone
    frozen; ``ce_weight`` > 0 adds the text cross-entropy ("kl+ce" with 1)."""

    kl_weight: ClassVar[float] = 1.0
    ce_weight: float = 0.0  # type: ignore[misc]  (an option here, fixed at 1 for "ce")

    def validate(self) -> None:
        super().validate()
        if not is_number(self.ce_weight) or self.ce_weight < 0:  # NaN and inf refused too
            raise ConfigError(f"ce_weight must be a finite number >= 0; got {self.ce_weight!r}")


def _build_text_exits(cfg: ExitCEConfig, model: Any, data: Any, tokenizer: Any,
                      output_dir: Path | None) -> Prepared:
    ks = tuned_exits(model)
    backbone = model.backbone
    depths = [model.exit_layers[k] for k in ks]
    device = backbone.lm_head.weight.device
    eos, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
    reused = False
    if data is None:
        raw, reused = self_generated_sequences(
            model, tokenizer, cfg.prompts, cfg.num_generations, cfg.gen_tokens, cfg.seed,
            pad_id, eos, output_dir)
        seqs = tokenize_texts(raw, None, cfg.seq_len, backbone.vocab_size)
    else:
        seqs = tokenize_texts(data, tokenizer, cfg.seq_len, backbone.vocab_size)
    train, held = split_holdout(seqs, cfg.eval_fraction, cfg.seed)
    heads = nn.ModuleDict({str(k): model.heads[k] for k in ks})

    def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float | None]]:
        ids, mask = batch_at_step(train, step, cfg.batch_size, cfg.seed, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        exits, final = exit_and_final_logits(model, ks, ids, mask, grad=True)
        per_exit = exit_text_losses(exits, final, ids, mask, cfg.kl_weight, cfg.ce_weight,
                                    exit_vocab_ids(model, ks))
        return per_exit.mean(), {str(d): float(v) for d, v in zip(depths, per_exit.detach())}

    def evaluate() -> dict[str, float]:
        scores = top1_agreement(model, ks, held, pad_id, cfg.batch_size, device)
        return {str(d): s for d, s in zip(depths, scores)}

    def train_mode() -> None:
        for k in ks:
            model.heads[k].train()

    task = Task(
        module=heads, params=[p for k in ks for p in model.heads[k].parameters()], root=model,
        step_loss=step_loss, evaluate=evaluate, train_mode=train_mode,
        setup=lambda: set_draft_vocabularies(model, ks, train, pad_id, cfg.batch_size),
        settings={"objective": cfg.registered_name, "exit_layers": depths,
                  "model": backbone.describe(), "kl_weight": cfg.kl_weight,
                  "ce_weight": cfg.ce_weight, "batch_size": cfg.batch_size,
                  "seq_len": cfg.seq_len, "seed": cfg.seed, "num_sequences": len(seqs),
                  "eval_fraction": float(cfg.eval_fraction), "data": data_digest(seqs)},
    )
    return Prepared(task=task, steps=cfg.steps, metric="agreement", num_train=len(train),
                    num_eval=len(held), extras={"self_generated": data is None,
                                                "reused_generation_cache": reused})

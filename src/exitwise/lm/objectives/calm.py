"""CALM's early-exit classifier (Schuster et al., 2022, sec. 3.5), trained on a frozen LM.

    result = ew.tune_exits(lm, texts, ew.lm.CalmConfig(exit_layers=[4, 8]), tokenizer=tok,
                           output_dir="runs/calm_clf")
    result.table()                      # held-out BCE per exit; AUC etc. in result.extras
    policy = ew.get_policy("calm_learned", threshold=0.8, classifier="runs/calm_clf")
    out = ew.generate(lm, ids, strategy="early_exit", policy=policy, kv="skip")

Data: the frozen model runs (no grad) over whole sequences, texts (strings with a tokenizer, or
token-id lists) or, with ``texts=None``, the model's own greedy/sampled continuations of
prompts (:mod:`exitwise.lm.data`; CALM trains on the model's own outputs). At every
real position and every exit depth d it records the hidden state h_d (H,) and CALM's
token-level consistency label: 1 iff the exit head's argmax equals the final layer's argmax.
Teacher-forcing a greedy continuation gives exactly the states greedy decoding sees.

Model: one probe per exit (:class:`~exitwise.policies.calm_learned.ConsistencyProbe`, linear or
2-layer MLP on standardized h_d). It starts as the constant predictor of the training base rate
(zero weights, bias logit(rate)), so ``bce_before`` is the held-out BCE of "chance" (the best
input-blind predictor) and any drop below it is learned signal. Loss: BCE averaged over tokens,
then over exits (CALM), AdamW on random token minibatches (drawn from ``(seed, step)``, so a
resumed run draws the same ones). Sequences are split into train /
held-out before collection, so held-out tokens come from unseen sequences.

Where the weights go: ``result.artifact.save_pretrained(folder)`` (JSON + safetensors; done
into ``output_dir`` when it is given). The classifier is the ``calm_learned`` policy's parameter,
not an exit head: it is needed for a plain HF LM too (no MultiExitModel), and policies stay
separable from models, so it lives in its own folder, referenced by the policy's ``to_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...backbones import decoder_of
from ...backbones.special_tokens import eos_and_pad
from ...errors import ConfigError, DataError
from ...modes import eval_mode
from ...generation.exit_points import resolve_exit_points
from ...policies.calm_learned import KINDS, CalmExitClassifier
from ..data import (
    data_digest,
    derived_seed,
    pad_batch,
    self_generated_sequences,
    split_holdout,
    tokenize_texts,
)
from ..loop import Task
from .base import ObjectiveConfig, Prepared, is_pos_int, register_objective


def consistency_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CALM's loss for one exit: binary cross-entropy of the consistency logits (N,) against
    labels (N,) (1 where the exit's token equals the final layer's), averaged over tokens."""
    return F.binary_cross_entropy_with_logits(logits, labels)


@torch.no_grad()
def collect_consistency_data(
    backbone: Any, points: list[Any], seqs: list[list[int]], pad_id: int, batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """depth -> (states (N, H) float32 on CPU, labels (N,) float 0/1) over the real tokens of
    ``seqs`` (right-padded batches through the frozen backbone, no cache). ``points``:
    :class:`~exitwise.generation.exit_points.ExitPoint` list. Stops after ``max_tokens``."""
    device = backbone.lm_head.weight.device
    by_depth = {p.depth: p for p in points}
    xs: dict[int, list[torch.Tensor]] = {d: [] for d in by_depth}
    ys: dict[int, list[torch.Tensor]] = {d: [] for d in by_depth}
    count = 0
    for s in range(0, len(seqs), batch_size):
        if max_tokens is not None and count >= max_tokens:
            break
        ids, mask = pad_batch(seqs[s : s + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        real = mask.bool()
        state = backbone.start(input_ids=ids, attention_mask=mask)
        tops: dict[int, torch.Tensor] = {}
        for i in range(backbone.num_layers):
            state = backbone.step(i, state)
            point = by_depth.get(i + 1)
            if point is not None:
                hidden = state.hidden[real]  # (n, H): every real position predicts a token
                xs[i + 1].append(hidden.float().cpu())
                tops[i + 1] = point.head.token_logits(hidden[:, None])[:, 0].argmax(-1)
        final = backbone.lm_logits(backbone.final_norm(state.hidden[real])).argmax(-1)
        for d, top in tops.items():
            ys[d].append((top == final).float().cpu())
        count += int(real.sum())
    out = {}
    for d in by_depth:
        x, y = torch.cat(xs[d]), torch.cat(ys[d])
        if max_tokens is not None:
            x, y = x[:max_tokens], y[:max_tokens]
        out[d] = (x, y)
    return out


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties averaged); nan with one class only."""
    pos = float(labels.sum())
    neg = float(labels.numel()) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    cum = counts.cumsum(0).double()
    ranks = (cum - (counts.double() - 1) / 2)[inverse]  # 1-based average ranks
    return float((ranks[labels > 0.5].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _init_probe(probe: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Standardization from the training states; output = logit(base rate) for every input."""
    probe.mean.copy_(x.mean(0))
    probe.std.copy_(x.std(0, unbiased=False).clamp(min=1e-6))
    last = probe.net if isinstance(probe.net, torch.nn.Linear) else probe.net[-1]
    rate = float(y.mean())
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, _logit(rate))
    return rate


@torch.no_grad()
def _evaluate(clf: CalmExitClassifier, data: dict, device: Any) -> dict[int, tuple]:
    """depth -> (bce, accuracy at 0.5, auc) on held-out data."""
    out = {}
    for d, (x, y) in data.items():
        logits = torch.cat([clf.logit(x[s : s + 4096].to(device), d).cpu()
                            for s in range(0, x.shape[0], 4096)])
        bce = float(F.binary_cross_entropy_with_logits(logits, y))
        acc = float(((logits > 0).float() == y).float().mean())
        out[d] = (bce, acc, roc_auc(logits, y))
    return out


# -- the config ----------------------------------------------------------------------------
@register_objective("calm")
@dataclass
class CalmConfig(ObjectiveConfig):
    """CALM's consistency classifier on a frozen LM (see the module docstring).

    exit_layers: depths 1..L-1 to train a probe for (default: every available exit).
    steps; batch_size: tokens per step. kind: "linear" (CALM) or "mlp" (width ``mlp_hidden``,
    default H). max_tokens: cap on the training (and held-out) tokens, whose states are kept in
    memory (max_tokens x H per exit). seq_len, prompts, num_generations, gen_tokens: the text
    windows and, without texts, the model's own continuations (as ``ce``).
    """

    steps: int = 300
    lr: float = 1e-2
    batch_size: int = 512
    eval_fraction: float = 0.2
    exit_layers: list[int] | None = None
    kind: str = "linear"
    mlp_hidden: int | None = None
    seq_len: int = 128
    max_tokens: int = 50_000
    prompts: Sequence[Any] | None = None
    num_generations: int = 1
    gen_tokens: int = 64

    def validate(self) -> None:
        super().validate()
        for name in ("steps", "seq_len", "max_tokens", "num_generations", "gen_tokens"):
            if not is_pos_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive int; got {getattr(self, name)!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.mlp_hidden is not None and not is_pos_int(self.mlp_hidden):
            raise ConfigError(f"mlp_hidden must be a positive int; got {self.mlp_hidden!r}")
        if not 0.0 < float(self.eval_fraction) < 1.0:
            raise ConfigError(f"eval_fraction must be in (0, 1); got {self.eval_fraction!r}")

    def build(self, model: Any, data: Any, tokenizer: Any, output_dir: Any,
              progress: bool = True) -> Prepared:
        backbone, multi = decoder_of(model, "calm")
        points = resolve_exit_points(model, backbone, self.exit_layers)
        depths = [p.depth for p in points]
        eos, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
        out_dir = Path(output_dir) if output_dir is not None else None
        if data is None:
            owner = multi if multi is not None else SimpleNamespace(backbone=backbone)
            raw, _ = self_generated_sequences(owner, tokenizer, self.prompts,
                                              self.num_generations, self.gen_tokens, self.seed,
                                              pad_id, eos, out_dir)
            seqs = tokenize_texts(raw, None, self.seq_len, backbone.vocab_size)
        else:
            seqs = tokenize_texts(data, tokenizer, self.seq_len, backbone.vocab_size)
        if len(seqs) < 2:
            raise DataError("need at least 2 sequences (one is held out to measure the "
                            "classifier)")
        train_seqs, eval_seqs = split_holdout(seqs, float(self.eval_fraction), self.seed)
        with eval_mode(backbone):  # frozen teacher: no dropout in the states or labels
            train = collect_consistency_data(backbone, points, train_seqs, pad_id,
                                             max_tokens=self.max_tokens)
            held = collect_consistency_data(backbone, points, eval_seqs, pad_id,
                                            max_tokens=self.max_tokens)
        device = backbone.lm_head.weight.device
        clf = CalmExitClassifier(backbone.hidden_size, depths, self.kind, self.mlp_hidden,
                                 model=backbone.describe())

        def setup() -> None:
            with torch.no_grad():
                for d in depths:
                    _init_probe(clf.probe(d), *train[d])

        clf.to(device)
        n = train[depths[0]][0].shape[0]

        def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float | None]]:
            g = torch.Generator().manual_seed(derived_seed(self.seed, step))
            idx = torch.randint(0, n, (min(self.batch_size, n),), generator=g)
            losses = [consistency_bce(clf.logit(train[d][0][idx].to(device), d),
                                      train[d][1][idx].to(device)) for d in depths]
            return torch.stack(losses).mean(), {  # CALM: BCE averaged over the exits
                str(d): float(v.detach()) for d, v in zip(depths, losses)}

        def evaluate() -> dict[str, float]:
            return {str(d): v[0] for d, v in _evaluate(clf, held, device).items()}

        def finish(result: Any) -> None:
            scores = _evaluate(clf, held, device)
            base = {d: float(train[d][1].mean()) for d in depths}
            result.extras.update(
                base_rate=base,
                accuracy_after={d: scores[d][1] for d in depths},
                majority_accuracy={d: float((held[d][1] == float(base[d] >= 0.5)).float().mean())
                                   for d in depths},
                auc_after={d: scores[d][2] for d in depths},
            )
            result.artifact = clf
            if out_dir is not None:
                clf.save_pretrained(out_dir)

        task = Task(
            module=clf, params=list(clf.parameters()), root=clf, step_loss=step_loss,
            evaluate=evaluate, train_mode=clf.train, setup=setup,
            settings={"objective": self.registered_name, "model": backbone.describe(),
                      "exit_layers": depths, "kind": self.kind, "mlp_hidden": self.mlp_hidden,
                      "batch_size": self.batch_size, "seq_len": self.seq_len,
                      "max_tokens": self.max_tokens, "seed": self.seed,
                      "num_sequences": len(seqs), "eval_fraction": float(self.eval_fraction),
                      "data": data_digest(seqs)},
        )
        return Prepared(task=task, steps=self.steps, metric="bce", num_train=n,
                        num_eval=int(held[depths[0]][0].shape[0]),
                        extras={"self_generated": data is None}, finish=finish)

"""CALM's early-exit classifier (Schuster et al., 2022, sec. 3.5), trained on a frozen LM.

    result = train_calm_classifier(lm, texts, tokenizer, exit_layers=[4, 8], steps=300,
                                   output_dir="runs/calm_clf")
    result.table()                      # held-out BCE / accuracy / AUC per exit
    policy = result.policy(threshold=0.8)
    # same as get_policy("calm_learned", threshold=0.8, classifier="runs/calm_clf")
    out = ew.generate(lm, ids, strategy="early_exit", policy=policy, kv="skip")

Data: the frozen model runs (no grad) over whole sequences, texts (strings with a tokenizer, or
token-id lists) or, with ``texts=None``, the model's own greedy/sampled continuations of
prompts (:mod:`exitwise.training.lm_data`; CALM trains on the model's own outputs). At every
real position and every exit depth d it records the hidden state h_d (H,) and CALM's
token-level consistency label: 1 iff the exit head's argmax equals the final layer's argmax.
Teacher-forcing a greedy continuation gives exactly the states greedy decoding sees.

Model: one probe per exit (:class:`~exitwise.policies.calm_learned.ConsistencyProbe`, linear or
2-layer MLP on standardized h_d). It starts as the constant predictor of the training base rate
(zero weights, bias logit(rate)), so ``bce_before`` is the held-out BCE of "chance" (the best
input-blind predictor) and any drop below it is learned signal. Loss: BCE averaged over tokens,
then over exits (CALM), AdamW on random token minibatches. Sequences are split into train /
held-out before collection, so held-out tokens come from unseen sequences.

Where the weights go: ``result.classifier.save_pretrained(folder)`` (JSON + safetensors; also
done when ``output_dir`` is given). The classifier is the ``calm_learned`` policy's parameter,
not an exit head: it is needed for a plain HF LM too (no MultiExitModel), and policies stay
separable from models, so it lives in its own folder, referenced by the policy's ``to_dict``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..policies.calm_learned import KINDS, CalmExitClassifier, CalmLearnedPolicy
from .lm_data import pad_batch, self_generated_sequences, split_holdout, tokenize_texts


@dataclass
class CalmClassifierResult:
    """What :func:`train_calm_classifier` did (per-exit dicts are keyed by depth).

    base_rate: share of consistent training tokens. bce_before / bce_after: held-out BCE of the
    initial constant base-rate predictor / the trained classifier. accuracy_after at
    probability 0.5, majority_accuracy of always predicting the training majority,
    auc_after: held-out ROC AUC (0.5 = chance; nan when held-out labels are all one class).
    """

    classifier: CalmExitClassifier
    exit_layers: list[int]
    steps: int
    loss_history: list[float]
    base_rate: dict[int, float]
    bce_before: dict[int, float]
    bce_after: dict[int, float]
    accuracy_after: dict[int, float]
    majority_accuracy: dict[int, float]
    auc_after: dict[int, float]
    num_train_tokens: int
    num_eval_tokens: int
    self_generated: bool = False
    output_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def policy(
        self, threshold: float = 0.9, tau: float = 4.0, horizon: float | None = None
    ) -> CalmLearnedPolicy:
        """The ``calm_learned`` policy over this classifier (by folder when saved)."""
        clf: Any = self.output_dir if self.output_dir is not None else self.classifier
        return CalmLearnedPolicy(threshold=threshold, tau=tau, horizon=horizon, classifier=clf)

    def table(self) -> str:
        rows = ["exit  consistent  bce_before  bce_after  acc_after  acc_majority    auc"]
        for d in self.exit_layers:
            rows.append(
                f"{d:>4}  {self.base_rate[d]:>10.3f}  {self.bce_before[d]:>10.4f}  "
                f"{self.bce_after[d]:>9.4f}  {self.accuracy_after[d]:>9.3f}  "
                f"{self.majority_accuracy[d]:>12.3f}  {self.auc_after[d]:>5.3f}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classifier"] = self.classifier.config_dict()
        return out


def _check_args(steps: Any, lr: Any, batch_size: Any, max_tokens: Any, seq_len: Any,
                kind: Any) -> None:
    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    for name, v in (("steps", steps), ("batch_size", batch_size), ("max_tokens", max_tokens),
                    ("seq_len", seq_len)):
        if not pos_int(v):
            raise ConfigError(f"{name} must be a positive int; got {v!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ConfigError(f"lr must be a positive number; got {lr!r}")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")


@torch.no_grad()
def collect_consistency_data(
    backbone: Any, points: list[Any], seqs: list[list[int]], pad_id: int, batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """depth -> (states (N, H) float32 on CPU, labels (N,) float 0/1) over the real tokens of
    ``seqs`` (right-padded batches through the frozen backbone, no cache). ``points``:
    :class:`~exitwise.generation.confidence.ExitPoint` list. Stops after ``max_tokens``."""
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


def train_calm_classifier(
    model: Any,
    texts: Sequence[Any] | None = None,
    tokenizer: Any = None,
    *,
    exit_layers: list[int] | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 512,
    kind: str = "linear",
    mlp_hidden: int | None = None,
    weight_decay: float = 0.0,
    seq_len: int = 128,
    max_tokens: int = 50_000,
    eval_fraction: float = 0.2,
    self_generate_prompts: Sequence[Any] | None = None,
    num_generations: int = 1,
    gen_tokens: int = 64,
    output_dir: str | Path | None = None,
    seed: int = 0,
) -> CalmClassifierResult:
    """Train CALM's per-exit consistency classifier on a frozen LM.

    model: a Hugging Face causal LM (exits read the shared final norm + LM head) or a
        :class:`~exitwise.model.MultiExitModel` with position-wise ``lm`` exit heads (their
        trained heads define the exit tokens, as in decoding).
    texts: strings (with ``tokenizer``) or token-id lists, cut into ``seq_len`` windows; None:
        the model's own continuations of ``self_generate_prompts`` (default: built-in prompts;
        strings need ``tokenizer``), ``num_generations`` per prompt of ``gen_tokens`` tokens
        (cached in ``output_dir``).
    exit_layers: depths 1..L-1 to train a probe for (default: every available exit).
    steps / lr / batch_size (tokens per step) / weight_decay: AdamW on token minibatches.
    kind: "linear" (CALM) or "mlp" (hidden width ``mlp_hidden``, default H).
    max_tokens: cap on training tokens (states kept in memory: max_tokens x H per exit).
    eval_fraction: share of sequences held out for the before/after metrics.
    output_dir: where the classifier is saved (``save_pretrained``); the policy then refers to
        it by path.
    """
    from ..backbones import HFDecoderBackbone, wrap_backbone
    from ..backbones.special_tokens import eos_and_pad
    from ..generation.confidence import resolve_exit_points
    from ..model import MultiExitModel

    _check_args(steps, lr, batch_size, max_tokens, seq_len, kind)
    if not 0.0 < float(eval_fraction) < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1); got {eval_fraction!r}")
    multi = isinstance(model, MultiExitModel)
    backbone = model.backbone if multi else wrap_backbone(model)
    if not isinstance(backbone, HFDecoderBackbone):
        raise ConfigError(
            "train_calm_classifier needs a decoder-only causal LM (or a MultiExitModel over one); "
            f"got a {type(backbone).__name__}"
        )
    points = resolve_exit_points(model, backbone, exit_layers)
    depths = [p.depth for p in points]
    eos, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
    out_dir = Path(output_dir) if output_dir is not None else None
    if texts is None:
        owner = model if multi else SimpleNamespace(backbone=backbone)
        raw, _ = self_generated_sequences(
            owner, tokenizer, self_generate_prompts, num_generations, gen_tokens, seed, pad_id,
            eos, out_dir,
        )
        seqs = tokenize_texts(raw, None, seq_len, backbone.vocab_size)
    else:
        seqs = tokenize_texts(texts, tokenizer, seq_len, backbone.vocab_size)
    if len(seqs) < 2:
        raise DataError("need at least 2 sequences (one is held out to measure the classifier)")
    train_seqs, eval_seqs = split_holdout(seqs, float(eval_fraction), seed)

    was_training = backbone.training
    backbone.eval()  # frozen teacher: no dropout in the states or labels
    try:
        train = collect_consistency_data(backbone, points, train_seqs, pad_id,
                                         max_tokens=max_tokens)
        held = collect_consistency_data(backbone, points, eval_seqs, pad_id,
                                        max_tokens=max_tokens)
    finally:
        backbone.train(was_training)

    device = backbone.lm_head.weight.device
    clf = CalmExitClassifier(
        backbone.hidden_size, depths, kind, mlp_hidden, model=backbone.describe()
    )
    rates = {}
    with torch.no_grad():
        for d in depths:
            rates[d] = _init_probe(clf.probe(d), *train[d])
    clf.to(device)
    before = _evaluate(clf, held, device)

    optimizer = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = train[depths[0]][0].shape[0]
    history: list[float] = []
    clf.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        losses = []
        for d in depths:
            x, y = train[d]
            logits = clf.logit(x[idx].to(device), d)
            losses.append(F.binary_cross_entropy_with_logits(logits, y[idx].to(device)))
        loss = torch.stack(losses).mean()  # CALM: BCE averaged over the exits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    clf.eval()
    after = _evaluate(clf, held, device)
    if out_dir is not None:
        clf.save_pretrained(out_dir)
    majority = {d: float((held[d][1] == float(rates[d] >= 0.5)).float().mean()) for d in depths}
    return CalmClassifierResult(
        classifier=clf,
        exit_layers=depths,
        steps=steps,
        loss_history=history,
        base_rate=rates,
        bce_before={d: before[d][0] for d in depths},
        bce_after={d: after[d][0] for d in depths},
        accuracy_after={d: after[d][1] for d in depths},
        majority_accuracy=majority,
        auc_after={d: after[d][2] for d in depths},
        num_train_tokens=n,
        num_eval_tokens=int(held[depths[0]][0].shape[0]),
        self_generated=texts is None,
        output_dir=str(out_dir) if out_dir is not None else None,
    )

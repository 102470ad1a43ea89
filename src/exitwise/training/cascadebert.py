"""``cascadebert``: fine-tune one member of a model cascade with CascadeBERT's difficulty-aware
objective (Li et al., "CascadeBERT: Accelerating Inference of Pre-trained Language Models via
Calibrated Complete Models Cascade", Findings of EMNLP 2021).

A cascade (:class:`exitwise.cascade.ModelCascade`) hands a row to the next, larger model when the
current one is unsure, so a small member's confidence must rank rows by how hard they are for
it. The difficulty-aware regularization (DAR) asks every *easy* row's confidence to exceed a
*hard* row's by a margin. For a batch with logits z (B, C), labels y (B,) and difficulty
d (B,) (True: hard)::

    c_i     = max_c softmax(z_i)_c                               the confidence, (B,)
    L_DAR   = mean_{i easy} max(0, margin - (c_i - c_{j(i)}))      j(i): a hard row
    L       = CE(z, y) + weight * L_DAR

Reference: lancopku/CascadeBERT, ``cascade_bert.py``, ``CascadeBERTForSequenceClassification``:
``pair_loss`` (DAR: ``nn.MarginRankingLoss(margin)`` between the easy rows' confidences and, for
each easy row, one hard row drawn uniformly with replacement, target +1) and ``forward`` (the
loss is the sum of every cascade model's cross-entropy plus ``margin_loss_weight * pair_loss``
on the *smallest* model's confidence only; a batch without an easy or without a hard row adds
0). Defaults are the released run script's (``glue_mrpc.sh``: ``CONF_MARGIN=0.5``,
``DAR_WEIGHT=0.5``; ``run_cascade.py``'s own argparse default margin is 0.3).

Which rows are hard: the reference reads a precomputed label per training row
(``difficulty`` "easy"/"hard" in ``data_difficulty/<task>.train.dif_5seeds-2level.json``, "the
training data with associated data difficulty for a 2L BERT-Complete model", README): whether
the small model, fine-tuned beforehand (five seeds, says the file name), gets the row right. The paper's full text
could not be read here (its abstract only), and the script that turned five seeds into two
levels is not in the repository. Two ways are offered:

- ``difficulty_models=None`` (default; a deviation): the member's own current prediction,
  detached: a row is hard when its argmax is wrong. The same definition (the small model's own
  correctness), measured on the model being trained instead of on earlier fine-tuned copies;
  it needs no extra training run or data column.
- ``difficulty_models=[folder, ...]`` (or MultiExitModel objects): trained copies of the member
  (e.g. the same recipe, other seeds) judge every training batch, frozen, in eval mode, at
  full depth; a row is hard when at least half of them get it wrong (one model: when it does).
  This is the reference's offline labelling done on the fly (same models, same rows). The
  stage's ``loss`` (used outside training, e.g. on an eval set) sees no inputs and falls back
  to the member's own correctness.

Deviations: the reference trains all cascade models in one run (one optimizer over the summed
losses); the members share no parameters, so here each member trains alone on its own terms
(the small one with ``cascadebert``, the largest with plain cross-entropy, e.g. ``joint`` on a
single-exit model): the same gradients, except that gradient-norm clipping applies per member.
``pairs="all"`` (not in the reference) replaces the random hard partner by the mean over every
hard row (the expectation of the sampled term; deterministic). The member is used at full
depth: only the backbone and the final exit's head train; other exits, if any, stay as they are.
Classification only (the confidence is a class probability).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model import MultiExitModel
from ..outputs import ExitOutputs
from .base import Stage, TrainingStrategy, backbone_parameters, head_parameters, register_strategy

PAIRS = ("sampled", "all")


def top_confidence(logits: torch.Tensor) -> torch.Tensor:
    """(B,) the largest class probability of (B, C) logits, in float32."""
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def own_difficulty(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool, True where the (detached) arg-max of (B, C) logits misses the label."""
    return logits.detach().argmax(-1) != labels


def difficulty_margin_loss(
    confidence: torch.Tensor,
    hard: torch.Tensor,
    margin: float = 0.5,
    pairs: str = "sampled",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CascadeBERT's DAR: ``mean_{i easy} max(0, margin - (c_i - c_j))`` (scalar).

    confidence: (B,) confidences; hard: (B,) bool difficulty.
    pairs: "sampled" (the reference): j is one hard row per easy row, drawn uniformly with
        replacement (``generator`` for reproducibility); "all": the mean over every
        (easy, hard) pair.
    0 (still part of the graph) when the batch has no easy or no hard row.
    """
    if pairs not in PAIRS:
        raise ConfigError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    hard = hard.to(device=confidence.device, dtype=torch.bool)
    if hard.shape != confidence.shape:
        raise ConfigError(f"difficulty has shape {tuple(hard.shape)}, confidences "
                          f"{tuple(confidence.shape)}")
    easy_c, hard_c = confidence[~hard], confidence[hard]
    if easy_c.numel() == 0 or hard_c.numel() == 0:
        return confidence.sum() * 0.0
    if pairs == "sampled":
        j = torch.randint(0, hard_c.numel(), (easy_c.numel(),), generator=generator,
                          device=hard_c.device if generator is None else generator.device)
        return F.relu(margin - (easy_c - hard_c[j.to(hard_c.device)])).mean()
    return F.relu(margin - (easy_c[:, None] - hard_c[None, :])).mean()


def cascadebert_loss(
    outputs: ExitOutputs,
    labels: torch.Tensor,
    margin: float = 0.5,
    weight: float = 0.5,
    pairs: str = "sampled",
    hard: torch.Tensor | None = None,
) -> torch.Tensor:
    """``CE(z, y) + weight * DAR`` on the final exit's logits z (B, C); ``hard`` (B,) bool
    defaults to the final exit's own mistakes (:func:`own_difficulty`)."""
    logits = outputs.logits[-1].float()
    if logits.shape[-1] < 2:
        raise ConfigError("cascadebert's difficulty-aware term compares class confidences; "
                          "a regression output (num_labels=1) has none")
    if hard is None:
        hard = own_difficulty(logits, labels)
    ce = F.cross_entropy(logits, labels)
    if not weight:
        return ce
    return ce + weight * difficulty_margin_loss(top_confidence(logits), hard, margin, pairs)


@register_strategy("cascadebert")
class CascadeBERTStrategy(TrainingStrategy):
    """One cascade member: backbone + final head on CE + ``weight`` * DAR (see module doc)."""

    tunes_backbone = True
    tasks = ("classification",)

    def __init__(
        self,
        margin: float = 0.5,
        weight: float = 0.5,
        pairs: str = "sampled",
        difficulty_models: Sequence[str | Path | nn.Module] | str | Path | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (
                0.0 <= float(margin) <= 1.0):
            raise ConfigError(f"cascadebert: margin is a gap between two probabilities, in "
                              f"[0, 1]; got {margin!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                float(weight) >= 0.0 and float(weight) < float("inf")):
            raise ConfigError(f"cascadebert: weight must be a finite number >= 0, got {weight!r}")
        if pairs not in PAIRS:
            raise ConfigError(f"cascadebert: pairs must be one of {PAIRS}, got {pairs!r}")
        self.margin, self.weight, self.pairs = float(margin), float(weight), pairs
        if difficulty_models is None:
            judges: list[Any] = []
        elif isinstance(difficulty_models, (str, Path, nn.Module)):
            judges = [difficulty_models]
        else:
            judges = list(difficulty_models)
            if not judges:
                raise ConfigError("cascadebert: difficulty_models is empty; give None to judge "
                                  "difficulty by the member's own predictions")
        self.difficulty_models = judges
        self._judges: list[MultiExitModel] | None = None

    def judges(self, model: MultiExitModel) -> list[MultiExitModel]:
        """The difficulty models, loaded (once) and checked against ``model``."""
        if self._judges is None:
            loaded = []
            for source in self.difficulty_models:
                judge = source if isinstance(source, nn.Module) else (
                    MultiExitModel.from_pretrained(source))
                if not isinstance(judge, MultiExitModel):
                    raise ConfigError(f"cascadebert: a difficulty model must be a trained "
                                      f"MultiExitModel (or its folder), got {type(judge).__name__}")
                loaded.append(judge.eval())
            self._judges = loaded
        for judge in self._judges:
            if judge.num_labels != model.num_labels:
                raise ConfigError(f"cascadebert: a difficulty model predicts {judge.num_labels} "
                                  f"labels, the member {model.num_labels}")
        return self._judges

    def judged_difficulty(self, inputs: dict[str, Any], labels: torch.Tensor,
                          judges: Sequence[MultiExitModel]) -> torch.Tensor:
        """(B,) bool: rows that at least half of ``judges`` get wrong."""
        wrong = []
        for judge in judges:
            judge.to(labels.device)
            with torch.inference_mode():
                pred = judge.full_depth(**inputs).argmax(-1)
            wrong.append((pred != labels).float())
        # inference tensors cannot index a tensor that autograd tracks: clone outside
        return (torch.stack(wrong).mean(0) >= 0.5).clone()

    def check(self, model: MultiExitModel) -> None:
        if model.task != "classification":
            raise ConfigError("cascadebert's difficulty-aware term compares class confidences; "
                              "it does not apply to a regression model")
        if model.num_exits > 1:  # it trains the final head only: the others would stay random
            raise ConfigError(
                f"cascadebert trains a complete model, one cascade member, through its final "
                f"exit; this model has {model.num_exits} exits (layers {model.exit_layers}), "
                "whose earlier heads it would leave untrained. Attach the final exit only "
                "(layers=[num_layers]; exitwise.cascade.cascade_members builds such members; "
                "on the command line: --layers with the last layer only)")

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        final = model.num_exits - 1
        margin, weight, pairs = self.margin, self.weight, self.pairs

        def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
            return cascadebert_loss(outputs, labels, margin, weight, pairs)

        step = None
        if self.difficulty_models:
            judges = self.judges(model)

            def step(module: nn.Module, inputs: dict[str, Any], labels: torch.Tensor):
                hard = self.judged_difficulty(inputs, labels, judges)
                outputs = module(**inputs)
                return cascadebert_loss(outputs, labels, margin, weight, pairs, hard), outputs

        return [Stage(name="stage-1",
                      trainable=lambda m: backbone_parameters(m) + head_parameters(m, [final]),
                      loss=loss, step=step)]

    def options(self) -> dict[str, Any]:
        sources = [str(s) if isinstance(s, (str, Path)) else f"<in-memory {type(s).__name__}>"
                   for s in self.difficulty_models]
        return {"margin": self.margin, "weight": self.weight, "pairs": self.pairs,
                "difficulty_models": sources or None, **super().options()}

"""Per-exit quality of a multi-exit model on a labelled dataset, and a table to print it.

Classification: each exit's accuracy, beside the majority-class rate of the same data (an exit
that does not beat it has learned nothing: it predicts one class, say). Regression (one
output): each exit's Pearson's r (Spearman's rho and the mean squared error alongside), beside
0, the correlation of a constant prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..analysis.scores import REGRESSION, regression_report
from ..errors import DataError, InputError
from ..modes import eval_mode
from .collate import default_collator

# An exit "beats the baseline" when it is at least this far above it (half a point).
LIVE_MARGIN = 0.005


@dataclass
class ExitEvaluation:
    """scores: per exit, shallowest first, the task metric (``metric``: "accuracy" or
    "pearson"). baseline: what a constant prediction scores on the same data (the
    majority-class rate; 0 for Pearson). extra: regression's spearman / mse per exit."""

    scores: list[float]
    metric: str
    baseline: float
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def dead(self) -> list[int]:
        """Exits (indices) no better than the baseline."""
        return [k for k, s in enumerate(self.scores) if not s > self.baseline + LIVE_MARGIN]


@torch.inference_mode()
def evaluate_exit_scores(
    model: Any,
    dataset: Dataset,
    data_collator: Callable[[list], dict[str, torch.Tensor]] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> ExitEvaluation:
    """Every exit's task metric on ``dataset`` from one forward per batch (raw logits: a
    temperature changes no arg-max). The model's train/eval mode is restored after."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise DataError("the evaluation dataset is empty")
    collate = data_collator or default_collator(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    device = next(model.parameters()).device
    regression = getattr(model, "task", None) == REGRESSION
    preds: list[torch.Tensor] = []
    gold: list[torch.Tensor] = []
    with eval_mode(model):
        for batch in tqdm(loader, desc="evaluating exits", disable=not progress, leave=False):
            labels = batch.pop("labels", batch.pop("label", None))
            if labels is None:
                raise DataError("the evaluation batches have no 'labels'")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            labels = model.check_labels(labels.to(device), int(labels.shape[0]))
            logits = model(**batch).stacked()  # (B, K, C)
            preds.append((logits[..., 0] if regression else logits.argmax(-1)).cpu())
            gold.append(labels.cpu())
    if not preds:
        raise DataError("the evaluation dataset yielded no examples")
    p, y = torch.cat(preds), torch.cat(gold)  # (N, K), (N,)
    if regression:
        reports = [regression_report(p[:, k], y) for k in range(p.shape[1])]
        return ExitEvaluation(
            [r["pearson"] for r in reports], "pearson", 0.0,
            {"spearman": [r["spearman"] for r in reports], "mse": [r["mse"] for r in reports]},
        )
    majority = float(torch.bincount(y).max()) / y.numel()
    return ExitEvaluation((p == y[:, None]).double().mean(0).tolist(), "accuracy", majority)


def evaluate_exits(
    model: Any,
    dataset: Dataset,
    data_collator: Callable[[list], dict[str, torch.Tensor]] | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> list[float]:
    """Each exit's accuracy (Pearson's r for a regression model), shallowest first."""
    return evaluate_exit_scores(model, dataset, data_collator, batch_size, progress).scores


def format_exit_table(
    accuracies: Sequence[float] | ExitEvaluation,
    exit_layers: Sequence[int],
    dead_heads: Sequence[str] = (),
    frozen_final: bool = False,
) -> str:
    """A fixed-width table: exit index, depth, accuracy (%) or Pearson's r; with an
    :class:`ExitEvaluation`, exits no better than a constant prediction are flagged, with a
    hint (``dead_heads``: the heads of the dead exits, so the hint only proposes the mean
    head where it is not already used; ``frozen_final``: the recipe kept the network's own
    classifier frozen as the final exit, which the hint then names when that exit is dead)."""
    ev = accuracies if isinstance(accuracies, ExitEvaluation) else None
    scores = ev.scores if ev else list(accuracies)
    metric = ev.metric if ev else "accuracy"
    if len(scores) != len(exit_layers):
        raise InputError(f"{len(scores)} scores for {len(exit_layers)} exits")
    dead = set(ev.dead) if ev else set()
    lines = [f"{'exit':>4}  {'layer':>5}  {metric:>8}"]
    for k, (depth, value) in enumerate(zip(exit_layers, scores)):
        text = f"{100 * value:>7.2f}%" if metric == "accuracy" else f"{value:>8.4f}"
        tag = "  (final)" if k == len(exit_layers) - 1 else ""
        if k in dead:
            tag += "  <- no better than a constant prediction"
        lines.append(f"{k:>4}  {depth:>5}  {text}{tag}")
    if dead and ev is not None:
        base = (f"the majority class's {100 * ev.baseline:.2f}%" if metric == "accuracy"
                else "r = 0")
        mean = "" if dead_heads and set(dead_heads) == {"mean"} else \
            "the 'mean' head (--head mean), "
        lines.append(
            f"{len(dead)} exit(s) do not beat {base}: they are dead and only cost time. Try "
            f"{mean}more epochs or a higher learning rate, or remove those exits (--layers); "
            "a very shallow exit may also be unable to solve the task."
        )
        if frozen_final and len(exit_layers) - 1 in dead:
            lines.append(
                "The final exit is dead too: this recipe kept the network's own classifier "
                "frozen, so it must come trained (a fresh num_classes=... head is random); "
                "or let the recipe train it (ztw: train_backbone=True).")
    return "\n".join(lines)

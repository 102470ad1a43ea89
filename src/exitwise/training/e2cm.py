"""E2CM's "training": class means of every exit's features, without any gradient step
(Görmez & Koyuncu, arXiv 2103.01148, sec. III; IJCNN 2022).

:func:`fit_class_means` runs the model twice over the training data, in eval mode and without
gradients, and fills every ``class_means`` head (:mod:`exitwise.heads.class_means`):

1. the mean pooled feature of each class at each such exit (``mu_c``, the reference's
   ``classFeatureMeansOf`` / ``AverageMeter`` per class and layer);
2. the mean distance of all rows to each class mean (``s_c``, the reference's
   ``meanOfDistsClasses``), which normalises the distances before the softmax.

The labels are the data's own (``labels="true"``, supervised E2CM) or the arg-max of the
model's final exit (``labels="predicted"``), for data without labels: the classes the trained
network itself assigns (e.g. the cluster ids of a clustering network) stand in for them. Other
exits (the final classifier of the backbone, trained heads) are left as they are.

Reference: ``alperengormez/class_means`` (``class_means.py``; ``train_test_functions.py``
``prepare_classmeans``; ``intermediate_output_functions.py``). Deviations: the reference
collects the un-pooled layer outputs, here the head's pooled feature (see the head). The
unsupervised variant: the paper states that E2CM serves unsupervised tasks too, but its
section on them could not be consulted here and the reference code has no such path; taking
the final exit's own predictions as the classes is this library's reading of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, InputError
from ..heads.class_means import ClassMeansHead
from ..modes import eval_mode

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

LABEL_SOURCES = ("true", "predicted")


@dataclass
class ClassMeansFit:
    """What :func:`fit_class_means` did.

    exits: indices of the ``class_means`` exits it filled.
    class_counts: (C,) rows per class it averaged over (the same at every exit).
    num_rows: rows read.
    """

    exits: list[int]
    class_counts: list[int] = field(default_factory=list)
    num_rows: int = 0


def _split(batch: Any) -> tuple[dict[str, Any], Any]:
    """A dataloader batch -> (backbone inputs, labels or None): dicts (``labels``/``label``
    keys) or ``(inputs, labels)`` pairs of vision loaders."""
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        labels = inputs.pop("labels", None)
        return inputs, inputs.pop("label", None) if labels is None else labels
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return {"pixel_values": batch[0]}, batch[1]
    raise InputError(
        f"cannot read a batch of type {type(batch).__name__}: give dicts or (inputs, labels)"
    )


def _device_of(model: MultiExitModel) -> torch.device:
    return model.temperatures.device


def _batches(loader: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    return tqdm(loader, total=total, disable=not progress, desc=desc)


def _class_means_exits(model: MultiExitModel) -> list[int]:
    return [k for k, h in enumerate(model.heads) if isinstance(h, ClassMeansHead)]


def check_fit_options(model: MultiExitModel, labels: str) -> list[int]:
    """The exits to fit; ConfigError for a model or option E2CM cannot serve."""
    if labels not in LABEL_SOURCES:
        raise ConfigError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if model.task != "classification":
        raise ConfigError("class means need classes: E2CM does not apply to a regression model "
                          "(num_labels=1)")
    exits = _class_means_exits(model)
    if not exits:
        raise ConfigError("the model has no class_means exit to fit; attach its exits with "
                          "head='class_means'")
    if labels == "predicted" and model.num_exits - 1 in exits:
        raise ConfigError("labels='predicted' takes the classes from the final exit, which is "
                          "itself a class_means head; give the final exit a classifier "
                          "(e.g. the model's own) or fit with labels='true'")
    return exits


@torch.no_grad()
def fit_class_means(
    model: MultiExitModel,
    loader: Iterable[Any],
    labels: str = "true",
    progress: bool = True,
) -> ClassMeansFit:
    """Fill every ``class_means`` head of ``model`` from ``loader`` (training data).

    loader: re-iterable batches (a list or a DataLoader, read twice): dicts of backbone
        inputs with ``labels``, or ``(inputs, labels)`` pairs. With ``labels="predicted"`` the
        batches need no labels.
    labels: ``"true"`` (the batches' labels) or ``"predicted"`` (the final exit's arg-max:
        E2CM without labels).
    Every class needs at least one row (InputError otherwise). The model is put in eval mode
    for the two passes and restored afterwards.
    """
    exits = check_fit_options(model, labels)
    if iter(loader) is loader:
        raise InputError("fit_class_means reads the data twice; give a list or a DataLoader, "
                         "not a one-shot iterator")
    device = _device_of(model)
    heads: list[ClassMeansHead] = [model.heads[k] for k in exits]  # type: ignore[misc]
    num_classes = model.num_labels
    sums = [torch.zeros(num_classes, h.in_features, dtype=torch.float64, device=device)
            for h in heads]
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    with eval_mode(model):
        # Pass 1: per-class sums of the pooled features (the input of each head's distance
        # layer, reported by return_features).
        rows = 0
        for batch in _batches(loader, progress, "class means"):
            inputs, y = _split(batch)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
            out = model(return_features=True, **inputs)
            b = out.logits[0].shape[0]
            y = _classes(model, out.logits[-1], y, labels, b).to(device)
            onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)  # (B, C)
            for s, k in zip(sums, exits):
                feat = out.features[k]  # type: ignore[index]
                s += onehot.T @ feat.to(torch.float64)
            counts += onehot.sum(0).long()
            rows += b
        if rows == 0:
            raise InputError("the loader yielded no batches")
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise InputError(f"class(es) {empty} have no row in the data; every class needs "
                             "at least one to have a mean")
        for head, s in zip(heads, sums):
            layer = head.classifier
            layer.means.copy_((s / counts.unsqueeze(1)).to(layer.means.dtype))
            layer.scales.fill_(1.0)
            layer.counts.copy_(counts)
        # Pass 2: mean distance of every row to each class mean (the scales); with scales at
        # 1 a head's logits are the negated distances.
        dist_sums = [torch.zeros(num_classes, dtype=torch.float64, device=device)
                     for _ in heads]
        for batch in _batches(loader, progress, "class-mean distances"):
            inputs, _ = _split(batch)
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
            out = model(**inputs)
            for d, k in zip(dist_sums, exits):
                d -= out.logits[k].to(torch.float64).sum(0)
        for head, d in zip(heads, dist_sums):
            # a class mean every row sits on (one row in all) has no spread: keep scale 1
            scale = (d / rows).clamp_min(torch.finfo(torch.float32).tiny)
            head.classifier.scales.copy_(scale.where(d > 0, torch.ones_like(scale)))
    return ClassMeansFit(exits=exits, class_counts=counts.cpu().tolist(), num_rows=rows)


def _classes(model: MultiExitModel, final_logits: torch.Tensor, y: Any, labels: str,
             batch_size: int) -> torch.Tensor:
    """(B,) class ids of a batch: its labels (checked) or the final exit's arg-max."""
    if labels == "predicted":
        return final_logits.argmax(-1)
    if y is None:
        raise InputError("labels='true' needs labelled batches ('labels' key or (inputs, "
                         "labels) pairs); without labels use labels='predicted'")
    return model.check_labels(torch.as_tensor(y), batch_size).long()

"""Does a dataset number its classes as the model does?

A torchvision ``ImageFolder`` numbers its classes by the sorted names of its sub-folders, so
a validation folder with one class more or less than the training folder shifts every id
after it: id 0 of one is another class than id 0 of the other, and accuracy computed on it
is silently wrong. Where a dataset says its class names (``classes``, also through a
``Subset``) and the model has ``label_names``, the two must agree, id by id.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import DataError


def dataset_class_names(dataset: Any) -> list[str] | None:
    """``dataset.classes`` (torchvision folders and datasets), looked for through
    ``torch.utils.data.Subset`` and loaders' ``.dataset``; None where none is said."""
    for _ in range(4):  # DataLoader -> Subset -> Subset -> folder
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (list, tuple)) and classes:
            return [str(c) for c in classes]
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return None


def check_class_names(dataset: Any, label_names: Sequence[str] | None, what: str) -> None:
    """DataError when ``dataset``'s class names are not ``label_names``, in the same order.

    Only names of one kind are compared: when the two share no name at all (an ImageNet
    folder's WordNet ids against a checkpoint's human-readable ``id2label``, ids fixed by a
    ``target_transform``), nothing can be said and nothing is refused."""
    names = dataset_class_names(dataset)
    if names is None or label_names is None or list(names) == list(label_names):
        return
    if not set(names) & set(label_names):
        return
    model = list(label_names)
    missing = [n for n in model if n not in names]
    extra = [n for n in names if n not in model]
    first = next((i for i, (a, b) in enumerate(zip(names, model)) if a != b),
                 min(len(names), len(model)))
    detail = []
    if extra:
        detail.append(f"classes the model does not have: {extra[:5]}")
    if missing:
        detail.append(f"model classes it lacks: {missing[:5]}")
    if not detail:
        detail.append("the same classes in another order")
    raise DataError(
        f"the {what} dataset numbers its classes differently from the model: from id {first} "
        f"on, its labels name other classes ({'; '.join(detail)}). Build it with the "
        "model's classes (for an ImageFolder, the same class sub-folders; empty ones count), "
        "or remap its labels to the model's label_names")

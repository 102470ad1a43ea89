"""Exit scorers: learned per-row scores that an exit policy reads besides the logits.

Some methods decide from a learned estimate rather than from the exit's own distribution:
BERxiT's learning-to-exit module (a certainty that the exit is right), DACT's halting units,
a meta consistency classifier. A scorer is one module attached to a
:class:`~exitwise.model.MultiExitModel` (``model.attach_scorer(name)``) that maps, at exit k,
the exit head's *feature* (the input of its classifier layer, (B, D_k)) and its raw logits
(B, C) to one score per row (B,). The model's ``forward`` returns the scores of every exit in
``ExitOutputs.scores`` (so strategies can train the scorer), the logits cache stores them
(``ExitLogitsCache.scores``, (N, E)), and the executor and the offline replay hand the score
of the current exit to policies that declare ``uses_scores`` (``decide(..., scores=)``): both
see the same numbers, so they still agree on every decision.

Policies still see no model: the score is one more per-row number, like the logits. Each
scorer kind is one file registered in :data:`SCORERS`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .base import classifier_layer

SCORERS: Registry[type["ExitScorer"]] = Registry("exit scorer")
register_scorer = SCORERS.register


class ExitScorer(nn.Module):
    """Base class. ``feature_dims[k]`` is the width of exit k's feature.

    Subclasses implement :meth:`forward` and :meth:`scorer_flops` and keep their options in
    ``self.options`` (JSON-able; saved with the model, passed back to ``__init__`` on load).
    """

    registered_name: str = "?"

    def __init__(self, feature_dims: list[int], num_labels: int, **options: Any) -> None:
        super().__init__()
        if not feature_dims:
            raise ConfigError("an exit scorer needs at least one exit")
        self.feature_dims = [int(d) for d in feature_dims]
        self.num_labels = int(num_labels)
        self.options = dict(options)

    def forward(self, k: int, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B,) the score of exit ``k`` from its feature (B, D_k) and raw logits (B, C)."""
        raise NotImplementedError  # pragma: no cover

    def scorer_flops(self, k: int, batch_size: int) -> torch.Tensor:
        """(B,) float64 FLOPs of scoring one row at exit ``k``."""
        raise NotImplementedError  # pragma: no cover


def build_scorer(name: str, feature_dims: list[int], num_labels: int,
                 **options: Any) -> ExitScorer:
    cls = SCORERS.get(name)
    try:
        return cls(feature_dims, num_labels, **options)
    except TypeError as err:
        raise ConfigError(f"bad options for exit scorer {name!r}: {err}") from None


def feature_width(head: nn.Module) -> int:
    """Width of the feature a scorer reads at ``head``: the input width of its classifier
    layer (see :func:`exitwise.heads.base.classifier_layer`)."""
    layer = classifier_layer(head)
    width = getattr(layer, "in_features", None)
    if width is None:
        raise ConfigError(
            f"the {type(head).__name__} exit head has no linear classifier layer whose input a "
            "scorer could read; use a head with one (linear, pooler, mean, mlp, ...)"
        )
    return int(width)

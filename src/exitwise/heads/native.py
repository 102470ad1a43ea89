"""``native``: the model's own task classifier as the final exit, unchanged.

When exits are attached to a model that already classifies (a Hugging Face
``*ForSequenceClassification`` or ``*ForImageClassification``, a timm or torchvision model
with its ``fc`` / ``classifier`` / ``head``, a :class:`~exitwise.backbones.SequentialBackbone`
given a ``classifier``), a fresh random final head would throw that classifier away, and every
number measured against "full depth" would be measured against a random classifier. This head
*shares* the model's own modules (no copy): its output is the model's own logits bit for bit
(same modules, same operations, same order), training the final exit trains them, and saving
writes their weights with the other heads.

The backbone adapter says where the classifier is and how the model applies it
(``backbone.own_classifier()`` -> :class:`OwnClassifier`); ``kind`` names the tail of the
model's own forward after the encoder / feature extractor:

- ``features``: ``classifier(features)`` on the (B, D) pre-logits features (vision models,
  sequential backbones);
- ``pooled``: BERT's ``classifier(dropout(pooler(hidden)))`` with the encoder's own pooler;
- ``albert``: ``classifier(dropout(tanh(pooler(hidden[:, 0]))))``;
- ``sequence``: ``classifier(hidden)``, the classification head reading the whole (B, T, H)
  sequence (RoBERTa, XLM-R, CamemBERT, ELECTRA);
- ``distilbert``: ``classifier(dropout(relu(pre_classifier(hidden[:, 0]))))``;
- ``deberta``: ``classifier(dropout(pooler(hidden)))`` with DeBERTa's context pooler.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import OwnClassifier  # noqa: F401  (re-exported: the adapters' answer)
from ..errors import ConfigError
from .base import ExitHead, register_head


def _features(m: Any, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](hidden)


def _pooled(m: Any, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](m["dropout"](m["pooler"](hidden)))


def _albert(m: Any, hidden: torch.Tensor) -> torch.Tensor:
    pooled = m["pooler_activation"](m["pooler"](hidden[:, 0]))
    return m["classifier"](m["dropout"](pooled))


def _sequence(m: Any, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](hidden)


def _distilbert(m: Any, hidden: torch.Tensor) -> torch.Tensor:
    pooled = F.relu(m["pre_classifier"](hidden[:, 0]))
    return m["classifier"](m["dropout"](pooled))


def _deberta(m: Any, hidden: torch.Tensor) -> torch.Tensor:
    return m["classifier"](m["dropout"](m["pooler"](hidden)))


TAILS: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = {
    "features": _features, "pooled": _pooled, "albert": _albert, "sequence": _sequence,
    "distilbert": _distilbert, "deberta": _deberta,
}


@register_head("native")
class NativeHead(ExitHead):
    """The backbone's own classifier (see module doc). Reads what the final exit reads:
    (B, T, H) with a mask for encoders, (B, D) pre-logits features for vision; returns
    (B, num_labels) exactly as the model's own forward does."""

    needs_own_classifier = True

    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.0) -> None:
        super().__init__(in_features, num_labels, 0.0)
        self.kind: str | None = None
        self.parts = nn.ModuleDict()

    def init_from_backbone(self, backbone: nn.Module) -> None:
        own = getattr(backbone, "own_classifier", lambda: None)()
        if own is None:
            raise ConfigError(
                f"head 'native' reuses the model's own classifier, but this "
                f"{type(backbone).__name__} has none (a base encoder, a headless timm model "
                "...): choose another final_head"
            )
        if own.num_labels != self.num_labels:
            raise ConfigError(
                f"the model's own classifier has {own.num_labels} outputs but num_labels="
                f"{self.num_labels}: give num_labels={own.num_labels}, or a final_head other "
                "than 'native' to replace the classifier"
            )
        if own.kind not in TAILS:  # pragma: no cover - adapter table error
            raise ConfigError(f"unknown classifier kind {own.kind!r}")
        self.kind = own.kind
        self.parts = nn.ModuleDict(own.modules)  # the model's own modules, shared

    @property
    def feature_layer(self) -> nn.Module:
        """The layer whose input is this exit's feature (self-distillation hints): the last
        linear layer of the classifier (a pool + flatten + linear classifier's linear)."""
        linears = [m for m in self.parts["classifier"].modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else self.parts["classifier"]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind is None:
            raise ConfigError("the native head was never bound to its backbone's classifier")
        return TAILS[self.kind](self.parts, hidden)

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        linears = [m for m in self.parts.modules() if isinstance(m, nn.Linear)]
        per_row = self.linear_flops(*linears) if linears else 0.0
        return torch.full((batch_size,), per_row, dtype=torch.float64)

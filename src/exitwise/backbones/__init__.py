"""Backbone adapters: a model as ``start / step / features / keep``."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Backbone, BackboneState
from .encoder_layouts import ENCODER_LAYOUTS, EncoderLayout, supported_encoder_types
from .hf_encoder import HFEncoderBackbone
from .sequential import SequentialBackbone


def wrap_backbone(model: nn.Module | Backbone) -> Backbone:
    """Pick the adapter for ``model``: an existing adapter, an HF encoder, or a Sequential."""
    if isinstance(model, Backbone):
        return model
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return HFEncoderBackbone(model)
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        return SequentialBackbone(model)
    raise UnsupportedModelError(
        f"cannot find an adapter for {type(model).__name__}: give a Hugging Face encoder "
        f"(model_type in {', '.join(supported_encoder_types())}), an nn.Sequential, or a "
        "Backbone subclass"
    )


__all__ = [
    "Backbone",
    "BackboneState",
    "ENCODER_LAYOUTS",
    "EncoderLayout",
    "HFEncoderBackbone",
    "SequentialBackbone",
    "supported_encoder_types",
    "wrap_backbone",
]

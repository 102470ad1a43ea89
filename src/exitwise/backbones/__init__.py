"""Backbone adapters: a model as ``start / step / features / keep``."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Backbone, BackboneState
from .decoder_layouts import DECODER_LAYOUTS, supported_decoder_types
from .encoder_layouts import ENCODER_LAYOUTS, EncoderLayout, supported_encoder_types
from .hf_decoder import DecodeContext, HFDecoderBackbone  # noqa: F401
from .hf_encoder import HFEncoderBackbone
from .sequential import SequentialBackbone
from .vision import VisionBackbone, is_vision_model
from .vision_layouts import VISION_LAYOUTS, VisionLayout, supported_vision_models


def _is_causal_lm(model: nn.Module, config: object) -> bool:
    """A decoder-only LM: a type in the decoder table, or any non-encoder model flagged as a
    decoder / carrying an LM head."""
    model_type = getattr(config, "model_type", None)
    if model_type in DECODER_LAYOUTS:
        return True
    if model_type in ENCODER_LAYOUTS:
        return False
    return bool(getattr(config, "is_decoder", False)) or hasattr(model, "lm_head")


def wrap_backbone(model: nn.Module | Backbone) -> Backbone:
    """Pick the adapter for ``model``: an existing adapter, an HF encoder, a vision model
    (timm / torchvision / HF ViT, see ``VISION_LAYOUTS``), or a Sequential."""
    if isinstance(model, Backbone):
        return model
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ENCODER_LAYOUTS and is_vision_model(model):
        return VisionBackbone(model)
    if config is not None and hasattr(config, "model_type"):
        if _is_causal_lm(model, config):
            return HFDecoderBackbone(model)  # unsupported types fail there, listing the table
        return HFEncoderBackbone(model)
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        return SequentialBackbone(model)
    raise UnsupportedModelError(
        f"cannot find an adapter for {type(model).__name__}: give a Hugging Face encoder "
        f"(model_type in {', '.join(supported_encoder_types())}), a vision model "
        f"({', '.join(supported_vision_models())}), an nn.Sequential, or a Backbone subclass"
    )


def decoder_of(model: nn.Module | Backbone, who: str = "this") -> tuple[HFDecoderBackbone, object]:
    """(the decoder-LM adapter, the multi-exit model holding it or None) for a Hugging Face
    causal LM, its :class:`HFDecoderBackbone`, or a multi-exit model over one (anything with
    a decoder ``backbone`` and ``heads``). ``who`` names the caller in the error."""
    inner = getattr(model, "backbone", None)
    if isinstance(inner, HFDecoderBackbone) and hasattr(model, "heads"):
        return inner, model
    try:
        backbone = wrap_backbone(model)
    except UnsupportedModelError:
        backbone = None
    if not isinstance(backbone, HFDecoderBackbone):
        raise UnsupportedModelError(
            f"{who} needs a decoder-only causal LM (model_type in "
            f"{', '.join(supported_decoder_types())}), its HFDecoderBackbone, or a "
            f"MultiExitModel over one; got {type(model).__name__}"
        )
    return backbone, None


__all__ = [
    "ENCODER_LAYOUTS",
    "VISION_LAYOUTS",
    "Backbone",
    "BackboneState",
    "DecodeContext",
    "EncoderLayout",
    "HFDecoderBackbone",
    "HFEncoderBackbone",
    "SequentialBackbone",
    "VisionBackbone",
    "VisionLayout",
    "decoder_of",
    "supported_encoder_types",
    "supported_vision_models",
    "wrap_backbone",
]

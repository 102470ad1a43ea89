"""Decoder-LM objectives, one file each, registered by name (``OBJECTIVES``)."""

from __future__ import annotations

from .answers import AnswersConfig
from .base import (
    OBJECTIVES,
    ObjectiveConfig,
    Prepared,
    TuningResult,
    get_objective,
    register_objective,
)
from .calm import CalmConfig
from .exit_text import ExitCEConfig, ExitKLConfig
from .free import FreeConfig
from .layerskip import LayerSkipConfig

__all__ = [
    "OBJECTIVES",
    "AnswersConfig",
    "CalmConfig",
    "ExitCEConfig",
    "ExitKLConfig",
    "FreeConfig",
    "LayerSkipConfig",
    "ObjectiveConfig",
    "Prepared",
    "TuningResult",
    "get_objective",
    "register_objective",
]

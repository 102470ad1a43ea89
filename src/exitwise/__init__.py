"""exitwise: make neural networks exit early, for real.

    import exitwise as ew
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="pooler", num_labels=2))
    outs = model(**batch)                              # every exit's logits
    res = model.early_exit(ew.get_policy("entropy", threshold=0.2), **batch)

Decoder LMs: ``ew.generate`` (greedy, self-speculative, early-exit decoding) and
``ew.tune_exits(model, data, ew.lm.AnswersConfig())`` (any objective of ``ew.lm``).
"""

from . import lm
from .backbones import (
    Backbone,
    BackboneState,
    HFDecoderBackbone,
    HFEncoderBackbone,
    SequentialBackbone,
    VisionBackbone,
    wrap_backbone,
)
from .cascade import ModelCascade
from .config import ExitConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ExitwiseError,
    InputError,
    UnsupportedModelError,
)
from .generation import GenerationConfig, generate
from .heads import HEADS, ExitHead, build_head, register_head
from .lm import generate_answers, tune_exits
from .model import MultiExitModel, attach_exits
from .outputs import EarlyExitResult, ExitOutputs
from .policies import POLICIES, ExitPolicy, get_policy, register_policy

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "BackboneState",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EarlyExitResult",
    "ExitConfig",
    "ExitHead",
    "ExitOutputs",
    "ExitPolicy",
    "ExitwiseError",
    "GenerationConfig",
    "HEADS",
    "HFDecoderBackbone",
    "HFEncoderBackbone",
    "InputError",
    "ModelCascade",
    "MultiExitModel",
    "POLICIES",
    "SequentialBackbone",
    "VisionBackbone",
    "UnsupportedModelError",
    "attach_exits",
    "build_head",
    "generate",
    "get_policy",
    "lm",
    "register_head",
    "register_policy",
    "tune_exits",
    "generate_answers",
    "wrap_backbone",
]

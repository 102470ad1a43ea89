"""exitwise: make neural networks exit early, for real.

    import exitwise as ew
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="pooler", num_labels=2))
    outs = model(**batch)                              # every exit's logits
    res = model.early_exit(ew.get_policy("entropy", threshold=0.2), **batch)
"""

from .backbones import (
    Backbone,
    BackboneState,
    HFDecoderBackbone,
    HFEncoderBackbone,
    SequentialBackbone,
    VisionBackbone,
    wrap_backbone,
)
from .config import ExitConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ExitwiseError,
    InputError,
    UnsupportedModelError,
)
from .heads import HEADS, ExitHead, build_head, register_head
from .model import MultiExitModel, attach_exits
from .outputs import EarlyExitResult, ExitOutputs
from .policies import POLICIES, ExitPolicy, get_policy, register_policy
from .generation import generate  # noqa: E402  (needs the model and policies above)


def tune_exits(*args, **kwargs):  # lazy: keeps ``import exitwise`` free of the training stack
    """See :func:`exitwise.training.lm_tuning.tune_exits`."""
    from .training.lm_tuning import tune_exits as _tune_exits

    return _tune_exits(*args, **kwargs)


def tune_exits_on_answers(*args, **kwargs):  # lazy, like tune_exits
    """See :func:`exitwise.training.lm_answer_tuning.tune_exits_on_answers`."""
    from .training.lm_answer_tuning import tune_exits_on_answers as _tune

    return _tune(*args, **kwargs)


def generate_answers(*args, **kwargs):  # lazy, like tune_exits
    """See :func:`exitwise.training.lm_answer_tuning.generate_answers`."""
    from .training.lm_answer_tuning import generate_answers as _generate_answers

    return _generate_answers(*args, **kwargs)


def layerskip_finetune(*args, **kwargs):  # lazy, like tune_exits
    """See :func:`exitwise.training.layerskip.layerskip_finetune`."""
    from .training.layerskip import layerskip_finetune as _layerskip_finetune

    return _layerskip_finetune(*args, **kwargs)


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
    "HEADS",
    "HFDecoderBackbone",
    "HFEncoderBackbone",
    "InputError",
    "MultiExitModel",
    "POLICIES",
    "SequentialBackbone",
    "VisionBackbone",
    "UnsupportedModelError",
    "attach_exits",
    "build_head",
    "generate",
    "get_policy",
    "layerskip_finetune",
    "register_head",
    "register_policy",
    "tune_exits",
    "tune_exits_on_answers",
    "generate_answers",
    "wrap_backbone",
]

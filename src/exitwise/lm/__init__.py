"""Decoder LMs: their training data, draft vocabularies and training objectives.

    answers = ew.generate_answers(model, prompt_ids, max_new_tokens=128)
    ew.tune_exits(model, answers, ew.lm.AnswersConfig(epochs=3))

Layout: ``data`` (token windows, batches by step, self-generated text), ``answers`` (the
model's own greedy answers), ``prompts`` (chat prompts from local text), ``draft_vocab``,
``exits`` (reading the intermediate exits), ``loop`` (the one training loop), ``objectives/``
(one file per objective, registered by name) and ``tune`` (the entry point).
"""

from __future__ import annotations

from .answers import generate_answers
from .objectives.answers import agreement_on_answers
from .objectives import (
    OBJECTIVES,
    AnswersConfig,
    CalmConfig,
    ExitCEConfig,
    ExitKLConfig,
    FreeConfig,
    LayerSkipConfig,
    ObjectiveConfig,
    TuningResult,
    get_objective,
    register_objective,
)
from .tune import tune_exits

__all__ = [
    "OBJECTIVES",
    "AnswersConfig",
    "CalmConfig",
    "ExitCEConfig",
    "ExitKLConfig",
    "FreeConfig",
    "LayerSkipConfig",
    "ObjectiveConfig",
    "TuningResult",
    "agreement_on_answers",
    "generate_answers",
    "get_objective",
    "register_objective",
    "tune_exits",
]

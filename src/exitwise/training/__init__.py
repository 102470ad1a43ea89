"""Training strategies for multi-exit models, on the Hugging Face Trainer.

    from exitwise.training import train
    result = train(model, train_ds, eval_ds, strategy="joint", output_dir="runs/joint",
                   strategy_options={"weights": "depth"}, learning_rate=2e-5, num_train_epochs=3)
    print(result.table())

Strategies are registered by name (one file each): ``joint``, ``two_stage``, ``exits_only``,
and the vision literature's ``branchynet``, ``sdn_ramp``, ``sdn_ic_only``, ``imta``,
``self_distill``, ``ztw``, ``boosted``, ``l2w``, ``meta_gf``, ``lgvit``, ``copycat_sl_vit``;
the NLP literature's ``fastbert``, ``berxit``, ``sweet``, ``elasticbert``, ``ensemble_ic``,
``romebert``, ``leebert``, ``elbert``, ``cats``, ``dact``, ``past_future``, ``cascadebert``
(E2CM needs no training of its exits: :func:`exitwise.training.e2cm.fit_class_means`).
Decoder LMs train their exits with :mod:`exitwise.lm` (one loop, objectives registered there).
A new one subclasses :class:`TrainingStrategy`, returns its :class:`Stage` list from
``build_stages`` and is registered with ``@register_strategy("name")``.
"""

from ..checkpoint import load_model_weights, save_model_weights
from . import (  # noqa: F401  (registers the built-in strategies)
    berxit,
    boosted,
    branchynet,
    cascadebert,
    cats,
    copycat,
    dact,
    elasticbert,
    elbert,
    ensemble_ic,
    exits_only,
    fastbert,
    imta,
    joint,
    l2w,
    leebert,
    lgvit,
    meta_gf,
    past_future,
    romebert,
    sdn,
    self_distill,
    smartbert,
    sweet,
    two_stage,
    ztw,
)
from .base import (
    STRATEGIES,
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    distillation_kl,
    exit_cross_entropy,
    exit_task_loss,
    get_strategy,
    gradient_equilibrium_scales,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)
from .collate import PaddingCollator, default_collator
from .evaluate import ExitEvaluation, evaluate_exit_scores, evaluate_exits, format_exit_table
from .exits_only import ExitsOnlyStrategy
from .joint import JointStrategy
from .loop import StageResult, TrainResult, train
from .schedules import exit_weights
from .trainer import ExitTrainer
from .two_stage import TwoStageStrategy
from .ztw import ztw_ensemble_weights

__all__ = [
    "STRATEGIES",
    "ExitTrainer",
    "ExitsOnlyStrategy",
    "JointStrategy",
    "PaddingCollator",
    "Stage",
    "StageResult",
    "TrainResult",
    "TrainingProgress",
    "TrainingStrategy",
    "TwoStageStrategy",
    "backbone_parameters",
    "default_collator",
    "distillation_kl",
    "gradient_equilibrium_scales",
    "ExitEvaluation",
    "evaluate_exit_scores",
    "evaluate_exits",
    "exit_cross_entropy",
    "exit_task_loss",
    "exit_weights",
    "format_exit_table",
    "get_strategy",
    "head_parameters",
    "load_model_weights",
    "register_strategy",
    "save_model_weights",
    "train",
    "weighted_exit_loss",
    "ztw_ensemble_weights",
]

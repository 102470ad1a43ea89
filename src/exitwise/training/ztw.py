"""``ztw``: Zero Time Waste (Wołczyk et al., NeurIPS 2021).

Two ideas that reuse the work earlier exits already did (reference: ``gmum/Zero-Time-Waste``,
``ztw_cv/architectures/early_exits/ztw.py`` and ``heads.py``, trained by
``ztw_cv/methods/early_exit.py``):

1. **Cascading**: each internal classifier (IC) also reads the previous IC's logits, detached,
   through a LayerNorm, concatenated with its pooled features before its one linear layer
   (build the model with ``head="cascade"``, ``combine="linear"``, and the network's own
   classifier as ``final_head``; the first IC has no previous one). Stage 1 trains the ICs on
   the mean of their cross-entropies, on the frozen pretrained network (backbone and final
   head frozen, as in the paper); with ``train_backbone=True`` the backbone and every head
   train together instead (mean over all exits; a network trained from scratch).
2. **Geometric ensembling**: IC k's decision uses ``q_k ∝ exp(b_k) prod_{j<=k} p_j^{w_kj}``
   (``w_kj = exp(a_kj) / (k + 1) > 0``, per-class bias ``b_k``), a learned product of the ICs'
   predictions so far. Stage 2 learns ``a`` and ``b`` on the frozen heads, minimising the mean
   over the ICs of ``CE(q_k, labels)``. ZTW builds no ensemble on the backbone's own final
   head: the final exit keeps its own prediction.

The ensemble lives in ``model.ensemble`` (a :class:`~exitwise.heads.GeometricEnsemble` over
the ICs, created by this strategy) and is saved with the heads (``ensemble.*`` tensors in
``exit_heads.safetensors``). :func:`ztw_ensemble_weights` gives it as plain lists for the
``ztw`` exit policy: ``{"weights": E x E (row k: w_k0..w_kk, zeros above the diagonal),
"bias": E x C}`` with E = exits - 1, to be applied to the exits' raw logits: ``log q_k = b_k +
sum_{j<=k} w_kj log_softmax(z_j)``, normalised over classes; the final exit returns its own.

Deviations: the reference trains the ensemble and the ICs with its own optimiser settings;
here ``ensemble_learning_rate`` (default 1e-2) is stage 2's learning rate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..heads import GeometricEnsemble, uses_previous_logits
from ..options import flag
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    head_parameters,
    register_strategy,
    weighted_exit_loss,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def ensemble_loss(ensemble: GeometricEnsemble):
    """Mean over the ICs k of ``CE(q_k, labels)``, ``q`` the ensemble of the ICs' logits."""

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        ics = [z.detach() for z in outputs.logits[: ensemble.num_members]]
        q = ensemble(ics)  # (B, E, C)
        return torch.stack(
            [F.cross_entropy(q[:, k], labels) for k in range(q.shape[1])]
        ).mean()

    return loss


def ztw_ensemble_weights(model: MultiExitModel) -> dict[str, list]:
    """The learned ensemble as ``{"weights": E x E, "bias": E x C}``, E = the internal
    classifiers (see the module doc); ``get_policy("ztw", threshold=t, **this)``."""
    if getattr(model, "ensemble", None) is None:
        raise ConfigError("this model has no ZTW ensemble; train it with strategy='ztw' first")
    return model.ensemble.to_dict()


@register_strategy("ztw")
class ZTWStrategy(TrainingStrategy):
    tunes_backbone = False

    def __init__(
        self,
        train_backbone: bool = False,
        ensemble_learning_rate: float | None = 1e-2,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        self.train_backbone = flag("ztw", "train_backbone", train_backbone)
        self.tunes_backbone = self.train_backbone
        if ensemble_learning_rate is not None and not float(ensemble_learning_rate) > 0:
            raise ConfigError(f"ensemble_learning_rate must be > 0, got {ensemble_learning_rate}")
        self.ensemble_learning_rate = (
            None if ensemble_learning_rate is None else float(ensemble_learning_rate)
        )

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        k_total = model.num_exits
        if k_total < 2:
            raise ConfigError("ztw needs at least one internal classifier besides the final exit")
        if not all(uses_previous_logits(h) for h in model.heads[1:-1]):
            warnings.warn(
                "ztw: the internal classifiers are not cascade heads (head='cascade'); "
                "training them without the cascade connections",
                stacklevel=3,
            )
        ensemble = model.attach_ensemble()
        if self.train_backbone:
            first = Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=weighted_exit_loss([1.0 / k_total] * k_total),
            )
        else:
            n_ic = k_total - 1
            first = Stage(
                name="stage-1",
                trainable=lambda m: head_parameters(m, range(n_ic)),
                loss=weighted_exit_loss([1.0 / n_ic] * n_ic + [0.0]),
            )
        lr = (
            {}
            if self.ensemble_learning_rate is None
            else {"learning_rate": self.ensemble_learning_rate}
        )
        second = Stage(
            name="stage-2",
            trainable=lambda m: list(m.ensemble.parameters()),
            loss=ensemble_loss(ensemble),
            args=lr,
        )
        return [first, second]

    def options(self) -> dict[str, Any]:
        return {
            "train_backbone": self.train_backbone,
            "ensemble_learning_rate": self.ensemble_learning_rate,
            **super().options(),
        }

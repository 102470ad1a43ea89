"""``boosted``: Boosted Dynamic Networks, BoostNet (Yu et al., AAAI 2023).

The exits form an additive model, as in gradient boosting (reference:
``SHI-Labs/Boosted-Dynamic-Networks``, ``train_cifar100.py`` ``train`` and
``models/dynamic_net.py`` ``DynamicNet``): exit k predicts ``F_k = f_k + r_k F_{k-1}``, where
``f_k`` is head k's own output, ``F_{k-1}`` the ensemble of the exits before it and ``r_k``
BoostNet's prediction reweighting (``--ensemble_reweight``; the authors' scripts use 0.5, the
code's default is 1). While training, ``F_{k-1}`` is detached, so head k (and the blocks it
reads) learns the residual the earlier exits left; all stages train jointly on every
mini-batch: ``loss = sum_k CE(f_k + r_k F_{k-1}.detach(), labels)``. The reweighting holds at
inference too (the reference's ``DynamicNet.forward``): build the model with
``head="cascade", head_kwargs={"combine": "additive", "reweight": r}``; the heads then output
``F_k`` themselves, so training and inference are the same function and this strategy reads
``r_k`` from the heads.

- ``gradient_rescaling`` (default on; the reference trains ``msdnet_ge``): the backbone
  gradients from the different exits are rescaled as in IMTA's gradient equilibrium
  (:func:`~exitwise.training.base.gradient_equilibrium_scales`).
- With other heads the strategy forms the sums in the loss only (``reweight`` option, default 1)
  and warns, since each exit then predicts its residual alone at inference.
- A final exit that is the model's own classifier (head ``native``, kept when the network has
  one) is not part of the sum: it predicts alone at inference, so its term is its own
  cross-entropy (r = 0) and the other exits decide whether the heads are additive.

Deviations: the reference reweights the training prior with ``r_{k-1}`` and the inference sum
with ``r_k`` (``forward_all`` vs ``forward``), which only agree for a constant ``r``; here both
use the heads' ``r_k``. Per-stage weight decays (``np.linspace`` over the stages) are left to
the optimizer settings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..options import flag
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingStrategy,
    backbone_parameters,
    gradient_equilibrium_scales,
    head_parameters,
    later_exits,
    register_strategy,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def is_additive(model: MultiExitModel) -> bool:
    """True when every exit after the first (:func:`~.base.later_exits`: a native final
    exit predicts alone) outputs ``f_k + r_k F_{k-1}.detach()`` itself."""
    return all(
        getattr(h, "combine", None) == "additive" and getattr(h, "detach_previous", False)
        for h in later_exits(model)
    )


def boosted_loss(additive: bool, reweights: Sequence[float]):
    """``sum_k CE(f_k + r_k F_{k-1}.detach())``.

    additive: the logits already are ``F_k`` (the heads add the detached prior), so the loss
    is ``sum_k CE(z_k)``; otherwise ``z_k`` is ``f_k`` and the sums are formed here.
    reweights: (K,) ``r_k`` (``r_0`` unused).
    """
    r = [float(x) for x in reweights]

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        z = [x.float() for x in outputs.logits]
        if len(z) != len(r):
            raise ConfigError(f"{len(r)} reweights for a model with {len(z)} exits")
        if additive:
            return torch.stack([F.cross_entropy(zk, labels) for zk in z]).sum()
        terms = [F.cross_entropy(z[0], labels)]
        running = z[0].detach()  # F_0
        for k in range(1, len(z)):
            prior = r[k] * running
            terms.append(F.cross_entropy(z[k] + prior, labels))
            running = (z[k] + prior).detach()
        return torch.stack(terms).sum()

    return loss


@register_strategy("boosted")
class BoostedStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        gradient_rescaling: bool = True,
        reweight: float | None = None,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if reweight is not None and not float(reweight) >= 0:
            raise ConfigError(f"reweight must be >= 0, got {reweight}")
        self.gradient_rescaling = flag("boosted", "gradient_rescaling", gradient_rescaling)
        self.reweight = None if reweight is None else float(reweight)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("boosted needs at least one exit besides the final one")
        additive = is_additive(model)
        boosted = later_exits(model)
        native_final = len(boosted) < model.num_exits - 1  # predicts alone: r = 0
        if additive:
            own = [float(h.reweight) for h in boosted]
            reweights = [1.0] + own + [0.0] * native_final
            if self.reweight is not None and any(r != self.reweight for r in own):
                raise ConfigError(
                    f"the additive heads reweight the previous prediction by {own}; "
                    f"reweight={self.reweight} would train another model than the one that "
                    "runs: set it on the heads (head_kwargs={'combine': 'additive', "
                    "'reweight': r})"
                )
        else:
            warnings.warn(
                "boosted: the heads do not add the previous exits' logits themselves; the "
                "boosting sums are formed in the loss only, so at inference each exit predicts "
                "its residual alone. Build the model with head='cascade', "
                "head_kwargs={'combine': 'additive'}",
                stacklevel=3,
            )
            r = 1.0 if self.reweight is None else self.reweight
            reweights = [r] * (model.num_exits - native_final) + [0.0] * native_final
        forward = (
            {"grad_scales": gradient_equilibrium_scales(model.num_exits)}
            if self.gradient_rescaling
            else {}
        )
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=boosted_loss(additive, reweights),
                forward_kwargs=forward,
            )
        ]

    def options(self) -> dict[str, Any]:
        return {
            "gradient_rescaling": self.gradient_rescaling,
            "reweight": self.reweight,
            **super().options(),
        }

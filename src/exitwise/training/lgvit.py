"""``lgvit``: LGViT's two-stage training (Xu et al., "LGViT: Dynamic Early Exiting for
Accelerating Vision Transformer", ACM MM 2023, Section 3.3).

Build the model with heterogeneous exits, local-perception heads on the shallow exits and
global-aggregation heads on the deep ones, the network's own classifier as the final exit::

    ExitConfig(layers=[4, ..., 11, 12], head={4: "lgvit_local", ..., 8: "lgvit_global", ...},
               final_head=...)

Reference: ``falcon-xu/LGViT`` (``scripts/train_baseline_deit.sh`` then
``scripts/train_distillation_deit.sh``; the losses in ``models/deit_highway/
modeling_highway_deit.py``):

1. **End-to-end training** (``train_strategy alternating_weighted``): backbone and every head
   train; optimizer steps alternate between the final exit's cross-entropy alone (even steps)
   and the depth-weighted mean of every exit's, ``sum_k d_k CE_k / sum_k d_k`` with ``d_k`` the
   exit's depth in blocks (the final exit weighs ``num_layers``). Outside training the loss is
   the weighted one.
2. **Self-distillation with the backbone frozen** (``distillation_LGViT``): only the early
   exits train (backbone and final classifier frozen; the final classifier is the teacher)::

       loss = (1 - a) sum_k CE_k + a sum_k T^2 KL_sum(p_final^T || p_k^T) / (B C)
            + hete * sum_{heterogeneous pairs} KL(softmax_c(F_last) || softmax_c(F_k))
            + homo * sum_{homogeneous pairs} MSE(...)

   - heterogeneous distillation (``cal_hete_loss``): the shallowest and the deepest local head
     and the shallowest and the deepest global head each match the last block's patch tokens:
     per token a KL over the channels (batch mean); a global head's teacher tokens are
     aggregated as the head aggregates its own;
   - homogeneous distillation (``cal_homo_loss``): every local head matches the deepest local
     head's tokens (MSE), every global head the deepest global head's token Gram matrix
     ``F^T F`` (MSE, ``align_type='inner'``); as in the reference the deepest head of each
     kind is not detached here.

   Defaults as the reference's script: ``a = 0.3`` (``loss_coefficient``), ``T = 2``,
   ``homo = hete = 0.01``. Exits with other heads get the prediction terms only.

Deviations: the teacher tokens of a global head are averaged over ``reduction`` windows (the
reference keeps every ``reduction``-th token, matching its heads' sampling; exitwise's global
head averages windows); feature terms over padded token sequences count real tokens only;
where the backbone's last step pools its tokens (the vision adapters apply the model's final
norm and pooling there), the teacher tokens are the last ones still tokens (the block before).
The heads differ from the reference's as :mod:`exitwise.heads.lgvit` states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..heads.lgvit import LGViTGlobalHead, LGViTLocalHead, token_grid
from ..outputs import ExitOutputs
from .base import (
    Stage,
    TrainingProgress,
    TrainingStrategy,
    backbone_parameters,
    exit_cross_entropy,
    head_parameters,
    register_strategy,
)
from .meta import unwrap

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


class AlternatingWeightedLoss:
    """Stage 1: the final exit's CE on even optimizer steps, ``sum_k d_k CE_k / sum_k d_k`` on
    odd ones (and outside training)."""

    def __init__(self, depths: Sequence[int], progress: TrainingProgress) -> None:
        self.depths = [float(d) for d in depths]
        self.progress = progress

    def final_only(self) -> bool:
        return self.progress.num_epochs is not None and self.progress.step % 2 == 0

    def __call__(self, outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        last = len(outputs.logits) - 1
        if self.final_only():
            return exit_cross_entropy(outputs, labels, last)
        terms = [d * exit_cross_entropy(outputs, labels, k) for k, d in enumerate(self.depths)]
        return torch.stack(terms).sum() / sum(self.depths)


def prediction_distillation(alpha: float, temperature: float):
    """``(1 - a) sum_k CE_k + a sum_k T^2 KL_sum(p_T || p_k) / (B C)`` over the early exits;
    the teacher is the final exit's logits (``outputs.logits[-1]``, detached)."""
    t = float(temperature)

    def loss(outputs: ExitOutputs, labels: torch.Tensor) -> torch.Tensor:
        teacher = F.log_softmax(outputs.logits[-1].detach().float() / t, -1)
        ce, kd = [], []
        for k in range(len(outputs.logits) - 1):
            z = outputs.logits[k].float()
            ce.append(exit_cross_entropy(outputs, labels, k))
            student = F.log_softmax(z / t, -1)
            kd.append(F.kl_div(student, teacher, reduction="sum", log_target=True)
                      * t * t / z.numel())
        return (1.0 - alpha) * torch.stack(ce).sum() + alpha * torch.stack(kd).sum()

    return loss


def hete_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """KL(softmax_c(teacher) || softmax_c(student)) summed over the real tokens and channels,
    over the batch size. student, teacher: (B, N, H); keep: (B, N) bool."""
    t = F.log_softmax(teacher.detach().float(), -1)
    s = F.log_softmax(student.float(), -1)
    per_token = (t.exp() * (t - s)).sum(-1)  # (B, N)
    return (per_token * keep).sum() / student.shape[0]


def homo_loss(student: torch.Tensor, teacher: torch.Tensor, keep_s: torch.Tensor,
              keep_t: torch.Tensor, inner: bool) -> torch.Tensor:
    """MSE of the tokens (B, N, H) over real entries, or (``inner``) of their Gram matrices
    ``F^T F`` (B, H, H), padding tokens zeroed."""
    a = student.float() * keep_s.unsqueeze(-1)
    b = teacher.float() * keep_t.unsqueeze(-1)
    if inner:
        return F.mse_loss(a.transpose(1, 2) @ a, b.transpose(1, 2) @ b)
    both = (keep_s & keep_t).unsqueeze(-1).to(a.dtype)
    return ((a - b) ** 2 * both).sum() / (both.sum() * a.shape[-1]).clamp_min(1.0)


class LGViTDistillStep:
    """Stage 2's training step: runs the frozen backbone, the early exits (with their token
    features) and the frozen final classifier, and returns the loss of the module doc."""

    def __init__(self, alpha: float, temperature: float, homo: float, hete: float) -> None:
        self.prediction = prediction_distillation(alpha, temperature)
        self.homo, self.hete = float(homo), float(hete)

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[torch.Tensor, ExitOutputs]:
        core = unwrap(model)
        backbone, last = core.backbone, core.num_exits - 1
        feats = []
        with torch.no_grad():  # the frozen backbone
            state = backbone.start(**inputs)
            final_tokens, final_mask = state.hidden, state.mask
            for i in range(backbone.num_layers):
                state = backbone.step(i, state)
                if i + 1 in core.exit_lookup:
                    feats.append(backbone.features(state))
                if state.hidden.dim() >= 3:  # tokens or a feature map, not pooled features
                    final_tokens, final_mask = state.hidden, state.mask
        logits, tokens = [], {}
        previous = None
        for k, (hidden, mask) in enumerate(feats[:last]):
            head = core.heads[k]
            if isinstance(head, (LGViTLocalHead, LGViTGlobalHead)):
                z, tok, keep = head.distill_tokens(hidden, mask)
                tokens[k] = (tok, keep)
            else:
                z = core.head_logits(k, hidden, mask, previous)
            logits.append(z)
            previous = z
        with torch.no_grad():  # the frozen final classifier: the teacher
            logits.append(core.head_logits(last, *feats[last], previous))
        outputs = ExitOutputs(logits=logits)
        loss = self.prediction(outputs, labels)
        if (self.hete or self.homo) and tokens:
            loss = loss + self.feature_terms(core, tokens, final_tokens, final_mask)
        return loss, outputs

    def feature_terms(
        self, core: nn.Module, tokens: dict[int, tuple[torch.Tensor, torch.Tensor]],
        final_tokens: torch.Tensor, final_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # the last block's tokens laid out as the heads lay out theirs (a ViT's patch grid)
        patches = any(getattr(core.heads[k], "patch_tokens", False) for k in tokens)
        grid, real, _ = token_grid(final_tokens, final_mask, patches)
        total = final_tokens.new_zeros((), dtype=torch.float32)
        for kind in (LGViTLocalHead, LGViTGlobalHead):
            group = [k for k in sorted(tokens) if isinstance(core.heads[k], kind)]
            if not group:
                continue
            for k in sorted({group[0], group[-1]}):  # heterogeneous: vs the last block
                tok, keep = tokens[k]
                if tok.shape[-1] != grid.shape[1]:
                    raise ConfigError(
                        f"lgvit: exit {k}'s tokens are {tok.shape[-1]} wide, the last block's "
                        f"{grid.shape[1]}; set hete_weight=0 for heads of another width"
                    )
                if kind is LGViTGlobalHead:
                    teacher, t_keep = core.heads[k].aggregate(grid, real)
                else:
                    teacher, t_keep = grid.flatten(2).transpose(1, 2), real.flatten(1) > 0
                if teacher.shape[1] != tok.shape[1]:
                    raise ConfigError(f"lgvit: exit {k} reads {tok.shape[1]} tokens, the last "
                                      f"block gives {teacher.shape[1]}")
                total = total + self.hete * hete_loss(tok, teacher, keep & t_keep)
            deepest = tokens[group[-1]]
            for k in group[:-1]:  # homogeneous: vs the deepest head of the same kind
                tok, keep = tokens[k]
                total = total + self.homo * homo_loss(
                    tok, deepest[0], keep, deepest[1], inner=kind is LGViTGlobalHead
                )
        return total


@register_strategy("lgvit")
class LGViTStrategy(TrainingStrategy):
    tunes_backbone = True

    def __init__(
        self,
        alpha: float = 0.3,
        temperature: float = 2.0,
        homo_weight: float = 0.01,
        hete_weight: float = 0.01,
        stage_args: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(stage_args)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        if not float(temperature) > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if not (float(homo_weight) >= 0 and float(hete_weight) >= 0):
            raise ConfigError("homo_weight and hete_weight must be >= 0")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.homo_weight, self.hete_weight = float(homo_weight), float(hete_weight)

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("lgvit needs at least one exit besides the final one")
        progress = TrainingProgress()
        last = model.num_exits - 1
        return [
            Stage(
                name="stage-1",
                trainable=lambda m: backbone_parameters(m) + head_parameters(m),
                loss=AlternatingWeightedLoss(model.exit_layers, progress),
                progress=progress,
            ),
            Stage(
                name="stage-2",
                trainable=lambda m: head_parameters(m, range(last)),
                loss=prediction_distillation(self.alpha, self.temperature),
                step=LGViTDistillStep(
                    self.alpha, self.temperature, self.homo_weight, self.hete_weight
                ),
            ),
        ]

    def options(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "homo_weight": self.homo_weight,
            "hete_weight": self.hete_weight,
            **super().options(),
        }

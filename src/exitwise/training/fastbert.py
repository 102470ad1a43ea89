"""``fastbert``: FastBERT's training (Liu et al., ACL 2020, sec. 3.2): fine-tune, then
self-distil the student classifiers from the teacher without labels.

Reference: the authors' ``fastbert`` package (autoliuweijie/FastBERT, ``FastBERT.fit``,
``_fine_tuning_backbone``, ``_self_distillation`` and ``_forward_for_loss``):

- stage 1 (``fine-tune``): the backbone and the teacher (the final exit) train on the
  teacher's cross-entropy with the labels;
- stage 2 (``self-distill``): the backbone and the teacher are frozen and run without grad;
  every student k < K-1 learns ``KL(p_teacher || p_k)`` (``nn.KLDivLoss(log_softmax(student),
  softmax(teacher))``, batch mean), summed over the students. No label is read: any text
  the model will see can serve, and the students learn the teacher's distribution, not the
  labels.

Exit by normalized entropy below a speed with the ``fastbert`` policy; the reference's student
classifier is the ``fastbert`` head.

Deviations: the paper writes the KL the other way round (D_KL(p_s, p_t)); the code, followed
here, computes KL(p_t || p_s). The reference distils at 10x the fine-tuning learning rate; here
both stages use the run's arguments unless ``stage_args`` say otherwise (e.g.
``stage_args=[{}, {"learning_rate": 2e-4}]``), as any strategy's stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..outputs import ExitOutputs
from .base import Stage, TrainingStrategy, head_parameters, register_strategy
from .two_stage import final_exit_loss as teacher_loss  # noqa: F401  (stage 1: the teacher's CE)
from .two_stage import fine_tune_stage

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel


def self_distillation_loss(outputs: ExitOutputs, labels: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Stage 2: ``sum_{k<K-1} KL(softmax(z_teacher) || softmax(z_k))``, each a batch mean;
    the teacher is detached and ``labels`` are not read."""
    teacher = F.log_softmax(outputs.logits[-1].detach().float(), -1)
    terms = [F.kl_div(F.log_softmax(z.float(), -1), teacher, log_target=True,
                      reduction="batchmean") for z in outputs.logits[:-1]]
    return torch.stack(terms).sum()


@register_strategy("fastbert")
class FastBERTStrategy(TrainingStrategy):
    tunes_backbone = True
    exit_policy = "fastbert"
    tasks = ("classification",)  # distillation between class distributions

    def build_stages(self, model: MultiExitModel) -> list[Stage]:
        if model.num_exits < 2:
            raise ConfigError("fastbert needs at least one student exit besides the teacher")
        final = model.num_exits - 1
        return [
            fine_tune_stage(model),  # the teacher's cross-entropy, as DeeBERT's stage 1
            Stage(name="stage-2", trainable=lambda m: head_parameters(m, range(final)),
                  loss=self_distillation_loss),
        ]

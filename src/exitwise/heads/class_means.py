"""``class_means``: E2CM's exit (Görmez & Koyuncu, "E2CM: Early Exit via Class Means for
Efficient Supervised and Unsupervised Learning", IJCNN 2022 / arXiv 2103.01148, sec. III):
no trained classifier, only the mean feature of every class at this depth.

A row's exit "logits" are its negative normalised Euclidean distances to the class means::

    z_c = - ||f - mu_c||_2 / s_c        f: the row's pooled feature (D,)

where ``mu_c`` is the mean training feature of class c and ``s_c`` the mean distance of all
training rows (every class) to ``mu_c``. The softmax of ``z`` is E2CM's class distribution and
its maximum the confidence that the exit rule compares to a threshold (policy ``e2cm``).
The means and scales are buffers, filled by :func:`exitwise.training.e2cm.fit_class_means`
without any gradient step, and saved and loaded with the other heads' weights. A fresh head
holds random means (as any fresh head holds random weights) until it is fitted.

Reference: the authors' code ``alperengormez/class_means``: ``intermediate_output_functions.py``
(``classFeatureMeansOf``: per-class mean of the layer output; ``distanceOf``:
``np.linalg.norm`` of the flattened difference), ``class_means.py`` (the distances of every
training row averaged per class, ``meanOfDistsClasses``, divide the distances before a softmax
of the negated distances; an exit fires when its max probability exceeds the threshold).

Deviations: the reference measures distances on the whole flattened layer output (C x H x W
of a CNN); exitwise heads read a fixed width, so the feature is pooled first: the mean over the
real tokens (``pooling="mean"``, default) or the first token (``"first"``) of a sequence, the
spatial mean of a feature map, a flat feature as it is. The later refactor of the reference
(``utils.softmax_from_dist``) divides each row's distances by their maximum instead, marked
TODO there; the published per-class training mean is followed here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import POOLINGS, ExitHead, register_head


class ClassMeanDistance(nn.Module):
    """(B, D) pooled features -> (B, C) logits ``-||f - mu_c|| / s_c``.

    Buffers: ``means`` (C, D) float32, ``scales`` (C,) float32 (> 0), ``counts`` (C,) int64
    (training rows per class at fitting; all 0 while unfitted).
    """

    def __init__(self, in_features: int, num_labels: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.randn(num_labels, in_features))
        self.register_buffer("scales", torch.ones(num_labels))
        self.register_buffer("counts", torch.zeros(num_labels, dtype=torch.long))

    def distances(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C) plain Euclidean distances to the class means, float32.

        As ``|f|^2 - 2 f.mu + |mu|^2`` (one matrix product, like a linear head's, and
        exportable to ONNX, which ``torch.cdist`` is not), clamped at a tiny positive value
        before the square root so that its gradient stays finite.
        """
        f, mu = pooled.float(), self.means.float()
        sq = f.pow(2).sum(-1, keepdim=True) - 2.0 * f @ mu.T + mu.pow(2).sum(-1)
        return sq.clamp_min(torch.finfo(torch.float32).tiny).sqrt()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return -(self.distances(pooled) / self.scales.float())


@register_head("class_means")
class ClassMeansHead(ExitHead):
    """E2CM's exit: pooled feature -> negative normalised distances to the class means.

    pooling: ``"mean"`` over the real tokens (default) or ``"first"`` token for (B, T, H)
    inputs; feature maps are averaged over space and flat features read as they are.
    ``dropout`` is accepted for the common head signature and never applied (nothing trains).
    """

    def __init__(self, in_features: int, num_labels: int, dropout: float = 0.1,
                 pooling: str = "mean") -> None:
        super().__init__(in_features, num_labels, dropout)
        if pooling not in POOLINGS:
            raise ConfigError(f"class_means: pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        # Named ``classifier`` so that ``forward(return_features=True)`` reports its input,
        # the pooled feature, which is what fitting the means reads.
        self.classifier = ClassMeanDistance(in_features, num_labels)

    @property
    def fitted(self) -> bool:
        """True once :func:`~exitwise.training.e2cm.fit_class_means` filled the means."""
        return bool(self.classifier.counts.sum() > 0)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, H) with mask (B, T), (B, C, *spatial) or (B, H) -> (B, H)."""
        if hidden.dim() != 3:
            return self.spatial_mean(hidden)
        if self.pooling == "first":
            return hidden[:, 0]
        return self.token_mean(hidden, mask)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.pool(hidden, mask)).to(hidden.dtype)

    def head_flops(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """Per row: the token mean (n x H adds; none for the first token), then per class a
        difference, square and sum over H (3H), a square root and a division."""
        d, c = float(self.in_features), float(self.num_labels)
        distance = c * (3.0 * d + 2.0)
        if self.pooling == "first" or mask is None:
            tokens = torch.zeros(batch_size, dtype=torch.float64)
        else:
            tokens = mask.sum(1).to(torch.float64)
        return tokens * d + distance

"""Token choice for the decoders: greedy argmax or sampling, and speculative rejection sampling.

``SamplingConfig`` turns logits into the *processed* distribution every sampler draws from:
temperature, then top-k, then top-p (nucleus), as Hugging Face ``generate`` orders them. With
``do_sample=False`` every choice is the argmax (the processing is skipped).

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft token x ~ q is kept
with probability min(1, p(x) / q(x)); on rejection a token is drawn from the residual
norm(max(0, p - q)). Whatever q, the token that comes out is distributed exactly as p:

    P(y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x q(x) min(1, p(x)/q(x))) residual(y)
         = min(q(y), p(y)) + (sum_x max(0, p(x) - q(x))) * max(0, p(y) - q(y)) / that sum
         = p(y).

Here p and q are both *processed* (the same temperature / top-k / top-p applied to the full
model's and to the exit head's logits), so the target the output follows is the processed
full-model distribution — exactly what plain sampling with the same settings draws from.

Shapes: V vocab; ``...`` any leading batch dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

# Below this residual mass a rejection is a float round-off event (p == q up to rounding):
# draw from p itself instead of normalising noise.
_RESIDUAL_EPS = 1e-12


@dataclass
class SamplingConfig:
    """How tokens are chosen.

    do_sample:   False -> argmax (greedy); True -> draw from the processed distribution.
    temperature: > 0; logits are divided by it.
    top_k:       keep only the k most likely tokens (None or 0: all).
    top_p:       keep the smallest set of most likely tokens whose mass reaches top_p, (0, 1].
    generator:   a ``torch.Generator`` on the logits' device for reproducible draws (None: the
                 global RNG).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"temperature must be a finite number > 0; got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError(f"top_k must be None or an int >= 0; got {k!r}")
        p = self.top_p
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0
        ):
            raise ConfigError(f"top_p must be None or a number in (0, 1]; got {p!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator; got {self.generator!r}")

    @staticmethod
    def check_types(temperature: Any, top_k: Any, top_p: Any) -> None:
        """What greedy decoding checks of the options it ignores: that they are numbers (a
        misspelt value is a mistake worth saying), not their range (``temperature=0`` is a
        common way to ask for greedy decoding, which HF's ``generate`` takes)."""
        for name, value, kinds in (("temperature", temperature, (int, float)),
                                   ("top_k", top_k, (int,)), ("top_p", top_p, (int, float))):
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise ConfigError(f"{name} must be a number; got {value!r}")

    # -- distributions ----------------------------------------------------------------------
    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed distribution (..., V) in float32 from logits (..., V)."""
        scores = logits.float() / float(self.temperature)
        v = scores.shape[-1]
        if self.top_k and self.top_k < v:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the strictly more likely tokens
            drop_sorted = before >= self.top_p  # the top token always has before == 0: kept
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row: (..., V) logits -> (...) ids (argmax or a processed draw)."""
        if not self.do_sample:
            return logits.argmax(-1)
        return draw(self.probs(logits), self.generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per distribution: probs (..., V) -> ids (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, 1, generator=generator)[:, 0]
    return ids.reshape(probs.shape[:-1])


def uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None):
    """U[0, 1) of ``shape`` on ``like``'s device, from ``generator``."""
    return torch.rand(shape, device=like.device, generator=generator)


# -- speculative rejection sampling -----------------------------------------------------------
def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """min(1, p / q) per token (..., V); 1 where q == 0 (such a token is never drafted)."""
    ratio = p / q.clamp_min(torch.finfo(q.dtype).tiny)
    return torch.where(q > 0, ratio.clamp(max=1.0), torch.ones_like(p))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) (..., V): what to draw from after a rejection. Where the residual
    has no mass (p == q, so a rejection cannot happen but for round-off) it is p itself."""
    res = (p - q).clamp_min(0.0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > _RESIDUAL_EPS, res / mass.clamp_min(_RESIDUAL_EPS), p)


def speculative_accept(
    drafts: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sample k drafted tokens per row against the full model.

    drafts: (A, k) draft tokens, drafts[:, i] ~ q[:, i].
    q:      (A, k, V) the draft distributions they were drawn from.
    p:      (A, k + 1, V) the full model's distributions after each prefix (p[:, i] is the
            distribution of the token drafts[:, i] stands for; p[:, k] follows all drafts).
    Returns (accepted (A,) in 0..k, the number of leading drafts kept; next (A,), the token
    after them: drawn from residual(p_n, q_n) after a rejection at n, or from p_k when all k
    were kept). Each row's kept drafts + next token follow p position by position.
    """
    a, k = drafts.shape
    if k:
        p_draft = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (A, k)
        q_draft = q.gather(-1, drafts[..., None])[..., 0]
        u = uniform((a, k), p, generator)
        # u < min(1, p/q)  <=>  u * q < p   (q > 0 for a drawn token)
        ok = (u * q_draft < p_draft).long()
        accepted = ok.cumprod(1).sum(1)
    else:
        accepted = torch.zeros(a, dtype=torch.long, device=p.device)
    # q padded with a zero row at k: the "residual" of p_k against nothing is p_k itself.
    q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], 1)  # (A, k + 1, V)
    idx = accepted[:, None, None].expand(a, 1, p.shape[-1])
    p_n = p.gather(1, idx)[:, 0]
    q_n = q_ext.gather(1, idx)[:, 0]
    nxt = draw(residual_distribution(p_n, q_n), generator)
    return accepted, nxt

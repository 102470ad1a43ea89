"""LayerSkip (Elhoushi et al., ACL 2024): full fine-tuning that makes early layers good exits.

    cfg = ew.lm.LayerSkipConfig(steps=1000, lr=2e-5, p_max=0.1, curriculum="rotational")
    result = ew.tune_exits(lm_or_model, texts, cfg, tokenizer=tok)
    ew.generate(model, ids, strategy="self_speculative", exit_layer=8)   # shared-head drafts

Unlike the exit-head objectives the whole decoder trains. Two pieces:

- **Layer dropout** rising with depth: block l (0-based of L) is skipped (identity residual)
  with rate ``p_l = p_max * D(l)``, ``D(l) = e^{l ln2 / (L-1)} - 1`` ("exp") or ``l / (L-1)``
  ("linear"), so D(0) = 0 and D(L-1) = 1. The draw is per *sample*: a dropped block runs only
  on the rows that keep it (their own mask and positions), so the saving is real compute. No
  dropout at eval (fine-tuning uses a constant time scale S(t) = 1, as in the paper).
- **Early-exit loss**: the hidden state after every block is read by the *shared* final norm
  and LM head; ``loss = sum_l e~_l CE_l`` with ``e~_l = C(t,l) e(l) / sum_i C(t,i) e(i)``.
  ``e(l) = e_scale * sum_{d=1}^{l+1} d`` for l < L-1 and ``e(L-1) = L + e_scale *
  sum_{d=1}^{L-1} d`` (the paper's cumulative depth scale; it counts from 0, which would give
  the first block weight 0, so depth is counted from 1 as in the authors' torchtune recipe;
  e_scale = 0 is plain fine-tuning). The curriculum C(t, l) (last layer always on):
  ``"rotational"``: layers with l mod R == t mod R; ``"gradual"``: from the last layer down,
  one more every T/(2L) steps; ``"none"``: all. Disabled layers' logits are never computed.

Reference: the authors' implementation in torchtune (``torchtune/modules/early_exit_loss.py``,
``torchtune/modules/layer_dropout.py``). Deviations:
the curriculum and loss scales as above; the per-sample dropout runs a block only on the rows
that keep it (the reference masks the block's output, computing it for every row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from ...backbones import DecodeContext, decoder_of
from ...backbones.special_tokens import eos_and_pad
from ...errors import ConfigError
from ..data import (
    batch_at_step,
    data_digest,
    derived_seed,
    pad_batch,
    split_holdout,
    tokenize_texts,
)
from ..loop import Task
from .base import ObjectiveConfig, Prepared, is_number, is_pos_int, register_objective

DROPOUT_SCALES = ("exp", "linear")
CURRICULA = ("rotational", "gradual", "none")


# -- the two mechanisms --------------------------------------------------------------------
def layer_dropout_rates(num_layers: int, p_max: float, scale: str = "exp") -> torch.Tensor:
    """(L,) float32 skip rate of each block: p_max * D(l), D rising from 0 (first) to 1 (last)."""
    if scale not in DROPOUT_SCALES:
        raise ConfigError(
            f"dropout_scale must be one of {', '.join(DROPOUT_SCALES)}; got {scale!r}")
    if num_layers < 2:
        return torch.zeros(num_layers)
    depth = torch.arange(num_layers, dtype=torch.float64) / (num_layers - 1)
    d = torch.exp(depth * math.log(2.0)) - 1.0 if scale == "exp" else depth
    return (p_max * d).float()


def sample_layer_drops(
    rates: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(L, B) bool: True where block l is skipped for row b; one uniform draw per (l, b)
    (``torch.rand(L, B, generator) < rates[:, None]``)."""
    return torch.rand(len(rates), batch_size, generator=generator) < rates[:, None]


def early_exit_curriculum(
    kind: str, step: int, num_layers: int, total_steps: int, rotation_interval: int = 4
) -> list[bool]:
    """C(t, l) for l in 0..L-1 at 0-based step t; the last layer is always on."""
    L = num_layers
    if kind == "none":
        on = [True] * L
    elif kind == "rotational":
        on = [l % rotation_interval == step % rotation_interval for l in range(L)]
    elif kind == "gradual":
        n = (step * 2 * L) // max(total_steps, 1)  # layers below the last enabled so far
        on = [l >= L - 1 - n for l in range(L)]
    else:
        raise ConfigError(f"curriculum must be one of {', '.join(CURRICULA)}; got {kind!r}")
    on[-1] = True
    return on


def early_exit_weights(enabled: Sequence[bool], early_exit_scale: float) -> torch.Tensor:
    """(L,) normalised loss weights e~_l (see module docstring); 0 where disabled."""
    L = len(enabled)
    cum = torch.arange(1, L + 1, dtype=torch.float64).cumsum(0)  # sum_{d=1}^{l+1} d
    w = early_exit_scale * cum
    w[-1] = L + (early_exit_scale * cum[-2] if L > 1 else 0.0)
    w = w * torch.tensor([bool(e) for e in enabled], dtype=torch.float64)
    return (w / w.sum()).float()


def layerskip_forward(
    backbone: Any, ids: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None = None,
    layers: Iterable[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Run the decoder with per-row layer skipping; {l: hidden (B, T, H) after block l}.

    drop: (L, B) bool, True = block l is the identity for row b (None: no skipping). A block
    runs only on the rows that keep it, with those rows' own mask and positions (rows never
    attend to each other, so this equals running them alone). layers: 0-based blocks whose
    output to return (default all); the hidden states are pre-final-norm.
    """
    wanted = set(range(backbone.num_layers) if layers is None else layers)
    state = backbone.start(input_ids=ids, attention_mask=mask)
    ctx, hidden = state.shared["ctx"], state.hidden
    out: dict[int, torch.Tensor] = {}
    for i in range(backbone.num_layers):
        keep = None if drop is None else ~drop[i].to(hidden.device)
        block, kind = backbone.blocks[i], backbone.layer_types[i]
        if keep is None or bool(keep.all()):
            hidden = backbone.run_block(block, i, kind, hidden, ctx)
        elif bool(keep.any()):
            rows = keep.nonzero().squeeze(1)
            sub = DecodeContext(None, ctx.positions[rows], ctx.attention_mask[rows])
            kept = backbone.run_block(block, i, kind, hidden[rows], sub)
            hidden = hidden.index_copy(0, rows, kept)  # dropped rows: identity residual
        if i in wanted:
            out[i] = hidden
    return out


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) over real positions whose next token is real."""
    real = mask.bool()
    nxt = real[:, :-1] & real[:, 1:]
    return F.cross_entropy(logits.float()[:, :-1][nxt], ids[:, 1:][nxt])


@torch.no_grad()
def layer_agreement(
    backbone: Any, seqs: list[list[int]], pad_id: int, batch_size: int, device: torch.device
) -> list[float]:
    """Per depth 1..L-1: share of real tokens where the shared-head exit's argmax equals the
    final layer's (no dropout)."""
    L = backbone.num_layers
    hits, count = torch.zeros(max(L - 1, 0), dtype=torch.float64), 0
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s : s + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        hiddens = layerskip_forward(backbone, ids, mask)
        real = mask.bool()
        top = [backbone.lm_logits(backbone.final_norm(h)).argmax(-1)[real]
               for _, h in sorted(hiddens.items())]
        for l in range(L - 1):
            hits[l] += (top[l] == top[-1]).sum().item()
        count += int(real.sum())
    return (hits / max(count, 1)).tolist()


def layerskip_loss(
    backbone: Any, ids: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor | None,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(sum_l w_l CE_l, {l: CE_l}) over the layers with w_l > 0: each block's output read by
    the shared final norm + LM head, blocks skipped per row as ``drop`` says."""
    on = [l for l in range(len(weights)) if weights[l] > 0]
    hiddens = layerskip_forward(backbone, ids, mask, drop, on)
    losses = {l: next_token_ce(backbone.lm_logits(backbone.final_norm(hiddens[l])), ids, mask)
              for l in on}
    total = sum(weights[l].to(ids.device) * losses[l] for l in on)
    return total, losses


# -- the config ----------------------------------------------------------------------------
@register_objective("layerskip")
@dataclass
class LayerSkipConfig(ObjectiveConfig):
    """LayerSkip fine-tuning of the whole decoder on text (see the module docstring).

    steps: optimizer steps (T of the gradual curriculum). seq_len: text windows.
    p_max, dropout_scale: the deepest block's skip rate and how rates rise with depth.
    early_exit_scale, curriculum, rotation_interval: the early-exit loss (e_scale, C, R).
    The model may be an HF causal LM, its adapter or a MultiExitModel (whose
    ``backbone_tuned`` is then set, so ``save_pretrained`` writes the backbone); attached exit
    heads are not trained here.
    """

    steps: int = 1000
    lr: float = 2e-5
    seq_len: int = 256
    max_grad_norm: float | None = 1.0
    p_max: float = 0.1
    dropout_scale: str = "exp"
    early_exit_scale: float = 1.0
    curriculum: str = "rotational"
    rotation_interval: int = 4

    def validate(self) -> None:
        super().validate()
        for name in ("steps", "seq_len", "rotation_interval"):
            if not is_pos_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive int; got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a token and its successor); "
                              f"got {self.seq_len}")
        if not is_number(self.p_max) or not 0.0 <= self.p_max <= 1.0:
            raise ConfigError(f"p_max (the deepest layer's skip rate) must be in [0, 1]; "
                              f"got {self.p_max!r}")
        if self.dropout_scale not in DROPOUT_SCALES:
            raise ConfigError(f"dropout_scale must be one of {', '.join(DROPOUT_SCALES)}; "
                              f"got {self.dropout_scale!r}")
        if not is_number(self.early_exit_scale) or self.early_exit_scale < 0:
            raise ConfigError(f"early_exit_scale must be a number >= 0; "
                              f"got {self.early_exit_scale!r}")
        if self.curriculum not in CURRICULA:
            raise ConfigError(f"curriculum must be one of {', '.join(CURRICULA)}; "
                              f"got {self.curriculum!r}")

    def build(self, model: Any, data: Any, tokenizer: Any, output_dir: Any,
              progress: bool = True) -> Prepared:
        backbone, multi = decoder_of(model, "layerskip")
        lm, L = backbone.model, backbone.num_layers
        device = backbone.lm_head.weight.device
        _, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
        seqs = tokenize_texts(data, tokenizer, self.seq_len, backbone.vocab_size)
        train, held = split_holdout(seqs, self.eval_fraction, self.seed)
        rates = layer_dropout_rates(L, float(self.p_max), self.dropout_scale)

        def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float | None]]:
            ids, mask = batch_at_step(train, step, self.batch_size, self.seed, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            # A generator per (seed, step): the layers dropped at a step ignore history.
            g = torch.Generator().manual_seed(derived_seed(self.seed, step + 1))
            drop = sample_layer_drops(rates, ids.shape[0], g)
            weights = early_exit_weights(
                early_exit_curriculum(self.curriculum, step, L, self.steps,
                                      self.rotation_interval), self.early_exit_scale)
            total, losses = layerskip_loss(backbone, ids, mask, drop, weights)
            return total, {str(l + 1): (float(losses[l].detach()) if l in losses else None)
                           for l in range(L)}

        def evaluate() -> dict[str, float]:
            scores = layer_agreement(backbone, held, pad_id, self.batch_size, device)
            return {str(d): scores[d - 1] for d in range(1, L)}

        def finish(_: Any) -> None:
            if multi is not None:
                multi.backbone_tuned = True

        task = Task(
            module=lm, params=list(lm.parameters()),
            root=multi if multi is not None else lm, step_loss=step_loss, evaluate=evaluate,
            train_mode=lm.train,
            settings={"objective": self.registered_name, "model": backbone.describe(),
                      "num_layers": L, "p_max": float(self.p_max),
                      "dropout_scale": self.dropout_scale,
                      "early_exit_scale": float(self.early_exit_scale),
                      "curriculum": self.curriculum, "rotation_interval": self.rotation_interval,
                      "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
                      "num_sequences": len(seqs), "eval_fraction": float(self.eval_fraction),
                      "data": data_digest(seqs)},
        )
        return Prepared(task=task, steps=self.steps, metric="agreement", num_train=len(train),
                        num_eval=len(held), extras={"dropout_rates": rates.tolist()},
                        finish=finish)

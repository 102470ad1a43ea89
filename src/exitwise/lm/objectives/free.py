"""FREE's shallow-deep module training (Bae et al., EMNLP 2023, "Fast and Robust
Early-Exiting Framework for Autoregressive Language Models with Synchronized Parallel
Decoding"), for decoder LMs.

    result = ew.tune_exits(lm_or_model, texts, ew.lm.FreeConfig(shallow_layer=6), tokenizer=tok)
    ew.generate(model, ids, strategy="early_exit", exit_layers=[6], kv="skip",
                policy=ew.get_policy("free_bmm"))

FREE trains two models that share their first L_s blocks: the *shallow* model (blocks 1..L_s,
then the exit read-out) and the *deep* model (all L blocks). The whole decoder trains with

    loss = (L_s * CE_shallow + L * CE_deep) / (L_s + L)  +  alpha * KD

where CE is the next-token cross-entropy (real positions whose next token is real) and KD a
layer-wise distillation of the deep model's hidden states into the shallow model's:
``N(h)`` is the shared final norm applied to a block's output, MSE(a, b) the mean squared
difference over real tokens and hidden units, student s = N(h_1) .. N(h_{L_s}), teacher
T_k = N(h_{t_k}) (detached) with t_k = round((k + 1) L / L_s) (k = 0..L_s-1, the uniform map):

- ``kd="dyna"`` (default, FREE's ``shallowdeep_kd_dyna``): with M[k, j] = MSE(T_k, s_j), align
  from the last teacher down: a_k = the j < a_{k+1} (a_{L_s} = L) with the smallest M[k, j]
  (a_{k+1} itself when no j is left), and KD = mean_k M[k, a_k];
- ``kd="unif"`` (``shallowdeep_kd_unif``): KD = mean_k M[k, k];
- ``kd="last"`` (``shallowdeep_kd_last``): KD = MSE(N(h_L), N(h_{L_s}));
- ``kd=None`` (``shallowdeep_ce``): no KD.

Reference: raymin0223/fast_robust_early_exit ``util/losses.py`` (``compute_intermediate_loss``,
``compute_layerwise_distillation_loss``) on the normalised decoder states of
``models/modeling_t5.py``; its scripts (``scripts/run_sum_cnndm.sh``) use ``kd_dyna`` with
``distill_layer_alpha=0.5`` and no layer transformation, learning rate 1e-4 with the Hugging
Face Trainer's defaults (AdamW, linear decay to 0, gradient norm clipped to 1).

The shallow read-out is the model's own final norm + LM head on h_{L_s} (as FREE's shared
``lm_head``), or, for a :class:`~exitwise.model.MultiExitModel` with an ``lm`` exit at L_s, that
head (its adapter / own norm train along).

Deviations: FREE trains T5 encoder-decoders; here the decoder-only LM is the deep model. The
reference's teacher map is a table for 24- and 12-layer decoders (``TEACHER_LAYERS``); the
uniform map above reproduces it where L_s divides L (for 24 -> 10 its entries differ) and
works for any depth. MSEs average over real tokens only (the reference includes padding
positions). The optional learned ``layer_transformation`` is not implemented. Held-out
top-1 agreement of the shallow and deep models is measured before and after.

The checkpoint holds the model and the shallow head's own pieces together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...backbones import decoder_of
from ...backbones.special_tokens import eos_and_pad
from ...errors import ConfigError
from ...heads.lm import LMHead
from ..data import batch_at_step, data_digest, pad_batch, split_holdout, tokenize_texts
from ..loop import Task
from .base import ObjectiveConfig, Prepared, is_number, is_pos_int, register_objective
from .layerskip import next_token_ce

KD_KINDS = ("dyna", "unif", "last", None)


# -- the loss ------------------------------------------------------------------------------
def shallow_deep_weights(shallow_layer: int, num_layers: int) -> tuple[float, float]:
    """(w_shallow, w_deep) = (L_s, L) / (L_s + L): each model's CE weighted by its depth."""
    total = shallow_layer + num_layers
    return shallow_layer / total, num_layers / total


def teacher_layers(num_layers: int, shallow_layer: int) -> list[int]:
    """Depths t_k = round((k + 1) L / L_s), k = 0..L_s-1, of the teacher states (1-based; the
    last is L)."""
    return [math.floor((k + 1) * num_layers / shallow_layer + 0.5) for k in range(shallow_layer)]


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (a - b)^2 over real tokens and hidden units: a, b (B, T, H), mask (B, T)."""
    real = mask.bool()
    return ((a.float() - b.float()) ** 2)[real].mean()


def dyna_alignment(mse: torch.Tensor) -> list[int]:
    """FREE's dynamic layer map: mse (n_teacher, n_student) -> the student index of each
    teacher, chosen from the last teacher down, strictly decreasing while possible."""
    n_t, n_s = mse.shape
    last = n_s + 1  # every student is allowed for the last teacher
    out: list[int] = []
    for k in range(n_t - 1, -1, -1):
        order = torch.argsort(mse[k].detach()).tolist()
        allowed = [j for j in order if j < last]
        pick = allowed[0] if allowed else last
        out.append(pick)
        last = pick
    return out[::-1]


def layer_kd_loss(
    states: list[torch.Tensor], shallow_layer: int, mask: torch.Tensor, kind: str | None
) -> torch.Tensor:
    """KD term from the normalised states N(h_1) .. N(h_L), each (B, T, H)."""
    if kind is None:
        return states[0].new_zeros((), dtype=torch.float32)
    num_layers = len(states)
    student = states[:shallow_layer]
    if kind == "last":
        return masked_mse(states[-1].detach(), student[-1], mask)
    teachers = [states[d - 1].detach() for d in teacher_layers(num_layers, shallow_layer)]
    if kind == "unif":
        return torch.stack([masked_mse(t, s, mask) for t, s in zip(teachers, student)]).mean()
    mse = torch.stack([torch.stack([masked_mse(t, s, mask) for s in student]) for t in teachers])
    align = dyna_alignment(mse)
    return torch.stack([mse[k, j] for k, j in enumerate(align)]).mean()


def free_losses(
    shallow_logits: torch.Tensor, deep_logits: torch.Tensor, states: list[torch.Tensor],
    ids: torch.Tensor, mask: torch.Tensor, shallow_layer: int, kd: str | None, kd_alpha: float,
) -> dict[str, torch.Tensor]:
    """{"total", "ce_shallow", "ce_deep", "kd"}: logits (B, T, V), states L x (B, T, H)."""
    w_s, w_d = shallow_deep_weights(shallow_layer, len(states))
    ce_s = next_token_ce(shallow_logits, ids, mask)
    ce_d = next_token_ce(deep_logits, ids, mask)
    kd_term = layer_kd_loss(states, shallow_layer, mask, kd)
    return {"total": w_s * ce_s + w_d * ce_d + kd_alpha * kd_term, "ce_shallow": ce_s,
            "ce_deep": ce_d, "kd": kd_term}


# -- forward -------------------------------------------------------------------------------
def shallow_deep_forward(
    backbone: Any, head: Any, shallow_layer: int, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One pass: (shallow logits (B, T, V), deep logits (B, T, V), [N(h_l) (B, T, H)] for
    l = 1..L)."""
    state = backbone.start(input_ids=ids, attention_mask=mask)
    ctx = state.shared["ctx"]
    states, shallow = [], None
    for i in range(backbone.num_layers):
        state = backbone.step(i, state)
        states.append(backbone.final_norm(state.hidden))
        if i + 1 == shallow_layer:
            shallow = (head.token_logits(state.hidden, ctx) if head is not None
                       else backbone.lm_logits(states[-1]))
    deep = backbone.lm_logits(states[-1])
    return shallow, deep, states


@torch.no_grad()
def shallow_deep_agreement(
    backbone: Any, head: Any, shallow_layer: int, seqs: list[list[int]], pad_id: int,
    batch_size: int, device: torch.device,
) -> float:
    """Share of real tokens of ``seqs`` where the shallow model's argmax equals the deep one's."""
    hits = count = 0
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s : s + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        shallow, deep, _ = shallow_deep_forward(backbone, head, shallow_layer, ids, mask)
        real = mask.bool()
        hits += int((shallow.argmax(-1)[real] == deep.argmax(-1)[real]).sum())
        count += int(real.sum())
    return hits / max(count, 1)


# -- the config ----------------------------------------------------------------------------
@register_objective("free")
@dataclass
class FreeConfig(ObjectiveConfig):
    """FREE's shallow-deep module training of the whole decoder (see the module docstring).

    shallow_layer: L_s (default: the MultiExitModel's single intermediate exit). kd, kd_alpha:
    the layer-distillation term ("dyna", "unif", "last" or None) and its weight. AdamW with a
    linear warmup then linear decay to 0, gradients clipped to 1, as FREE's scripts.
    """

    steps: int = 1000
    lr: float = 1e-4
    seq_len: int = 256
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    shallow_layer: int | None = None
    kd: str | None = "dyna"
    kd_alpha: float = 0.5

    def validate(self) -> None:
        super().validate()
        for name in ("steps", "seq_len"):
            if not is_pos_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive int; got {getattr(self, name)!r}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a token and its successor); "
                              f"got {self.seq_len}")
        if self.kd not in KD_KINDS:
            raise ConfigError(f"kd must be one of {KD_KINDS}; got {self.kd!r}")
        if not is_number(self.kd_alpha) or self.kd_alpha < 0:
            raise ConfigError(f"kd_alpha must be a number >= 0; got {self.kd_alpha!r}")
        if self.shallow_layer is not None and not is_pos_int(self.shallow_layer):
            raise ConfigError(f"shallow_layer must be a positive int; got {self.shallow_layer!r}")

    def _shallow(self, backbone: Any, multi: Any) -> tuple[Any, int]:
        """(the shallow exit head or None, L_s)."""
        L = backbone.num_layers
        inner = [d for d in (multi.exit_layers if multi is not None else []) if d < L]
        shallow = self.shallow_layer
        if shallow is None:
            if len(inner) != 1:
                raise ConfigError("give shallow_layer (FREE's L_s, the shallow model's depth)")
            shallow = inner[0]
        if not 1 <= shallow < L:
            raise ConfigError(f"shallow_layer must be an int in 1..{L - 1}; got {shallow!r}")
        head = None
        if multi is not None and shallow in multi.exit_layers:
            head = multi.heads[multi.exit_layers.index(shallow)]
            if not isinstance(head, LMHead):
                raise ConfigError(f"the exit at {shallow} is not an 'lm' head")
            if head.draft_vocab is not None:
                raise ConfigError("FREE trains the shallow exit over the whole vocabulary; "
                                  "build it without draft_vocab")
        return head, shallow

    def build(self, model: Any, data: Any, tokenizer: Any, output_dir: Any,
              progress: bool = True) -> Prepared:
        backbone, multi = decoder_of(model, "free")
        head, shallow = self._shallow(backbone, multi)
        lm, L = backbone.model, backbone.num_layers
        device = backbone.lm_head.weight.device
        _, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
        seqs = tokenize_texts(data, tokenizer, self.seq_len, backbone.vocab_size)
        train, held = split_holdout(seqs, self.eval_fraction, self.seed)
        # The model and the shallow head's own pieces, checkpointed together.
        trained = nn.ModuleDict({"lm": lm} if head is None else {"lm": lm, "head": head})

        def step_loss(step: int) -> tuple[torch.Tensor, dict[str, float | None]]:
            ids, mask = batch_at_step(train, step, self.batch_size, self.seed, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            shallow_logits, deep, states = shallow_deep_forward(backbone, head, shallow, ids,
                                                                mask)
            parts = free_losses(shallow_logits, deep, states, ids, mask, shallow, self.kd,
                                self.kd_alpha)
            return parts["total"], {k: float(parts[k].detach())
                                    for k in ("ce_shallow", "ce_deep", "kd")}

        def evaluate() -> dict[str, float]:
            return {str(shallow): shallow_deep_agreement(
                backbone, head, shallow, held, pad_id, self.batch_size, device)}

        def finish(_: Any) -> None:
            if multi is not None:
                multi.backbone_tuned = True

        task = Task(
            module=trained, params=list({id(p): p for p in trained.parameters()}.values()),
            root=multi if multi is not None else trained, step_loss=step_loss,
            evaluate=evaluate, train_mode=trained.train,
            settings={"objective": self.registered_name, "model": backbone.describe(),
                      "num_layers": L, "shallow_layer": shallow, "kd": self.kd,
                      "kd_alpha": float(self.kd_alpha), "batch_size": self.batch_size,
                      "seq_len": self.seq_len, "seed": self.seed, "num_sequences": len(seqs),
                      "eval_fraction": float(self.eval_fraction), "data": data_digest(seqs)},
        )
        return Prepared(task=task, steps=self.steps, metric="agreement", num_train=len(train),
                        num_eval=len(held), finish=finish)

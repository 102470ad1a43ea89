"""FREE's shallow-deep module training (Bae et al., EMNLP 2023, "Fast and Robust
Early-Exiting Framework for Autoregressive Language Models with Synchronized Parallel
Decoding"), for decoder LMs.

    result = free_finetune(lm_or_model, texts, tokenizer, shallow_layer=6, steps=1000)
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

``output_dir/free/`` holds ``model.safetensors`` (the model and the shallow head's own
pieces), ``optimizer.safetensors`` and ``state.json`` (written last), as
:mod:`.layerskip` does; no pickle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .layerskip import load_checkpoint, next_token_ce, save_checkpoint
from .lm_data import batch_at_step, pad_batch, split_holdout, tokenize_texts

KD_KINDS = ("dyna", "unif", "last", None)
CKPT_DIR = "free"


@dataclass
class FreeResult:
    """What :func:`free_finetune` did; histories hold one value per step (0-based)."""

    num_layers: int
    shallow_layer: int
    steps: int
    start_step: int
    loss_history: list[float]
    ce_shallow_history: list[float]
    ce_deep_history: list[float]
    kd_history: list[float]
    agreement_before: float
    agreement_after: float
    num_train_sequences: int
    num_eval_sequences: int
    output_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay to 0 at ``steps`` (the HF
    Trainer's default schedule); a pure function of the step, so a resume keeps it."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0, steps - step) / max(1, steps - warmup)


# -- the recipe ----------------------------------------------------------------------------
def _resolve(model: Any, shallow_layer: int | None) -> tuple[Any, Any, Any, int]:
    """(backbone, MultiExitModel or None, shallow head or None, L_s)."""
    from ..backbones import HFDecoderBackbone, wrap_backbone
    from ..heads.lm import LMHead
    from ..model import MultiExitModel

    multi = model if isinstance(model, MultiExitModel) else None
    try:
        backbone = multi.backbone if multi is not None else wrap_backbone(model)
    except UnsupportedModelError:
        backbone = None
    if not isinstance(backbone, HFDecoderBackbone):
        raise UnsupportedModelError(
            "free_finetune needs a Hugging Face causal LM, its HFDecoderBackbone or a "
            f"MultiExitModel over one; got {type(model).__name__}"
        )
    L = backbone.num_layers
    inner = [d for d in (multi.exit_layers if multi is not None else []) if d < L]
    if shallow_layer is None:
        if len(inner) != 1:
            raise ConfigError("give shallow_layer (FREE's L_s, the shallow model's depth)")
        shallow_layer = inner[0]
    if isinstance(shallow_layer, bool) or not isinstance(shallow_layer, int) or not (
            1 <= shallow_layer < L):
        raise ConfigError(f"shallow_layer must be an int in 1..{L - 1}; got {shallow_layer!r}")
    head = None
    if multi is not None and shallow_layer in multi.exit_layers:
        head = multi.heads[multi.exit_layers.index(shallow_layer)]
        if not isinstance(head, LMHead):
            raise ConfigError(f"the exit at {shallow_layer} is not an 'lm' head")
        if head.draft_vocab is not None:
            raise ConfigError("FREE trains the shallow exit over the whole vocabulary; build "
                              "it without draft_vocab")
    return backbone, multi, head, shallow_layer


def _check_args(steps: Any, lr: Any, batch_size: Any, seq_len: Any, kd: Any, kd_alpha: Any,
                warmup_steps: Any, save_every: Any, max_grad_norm: Any) -> None:
    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    for name, v in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                    ("save_every", save_every)):
        if not pos_int(v):
            raise ConfigError(f"{name} must be a positive int; got {v!r}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 (a token and its successor); got {seq_len}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ConfigError(f"lr must be a positive number; got {lr!r}")
    if kd not in KD_KINDS:
        raise ConfigError(f"kd must be one of {KD_KINDS}; got {kd!r}")
    if not isinstance(kd_alpha, (int, float)) or isinstance(kd_alpha, bool) or kd_alpha < 0:
        raise ConfigError(f"kd_alpha must be a number >= 0; got {kd_alpha!r}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}")
    if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float))
                                      or max_grad_norm <= 0):
        raise ConfigError(f"max_grad_norm must be a positive number or None; got {max_grad_norm!r}")


def free_finetune(
    model: Any,
    texts: Sequence[Any],
    tokenizer: Any = None,
    *,
    shallow_layer: int | None = None,
    steps: int = 1000,
    lr: float = 1e-4,
    batch_size: int = 8,
    seq_len: int = 256,
    kd: str | None = "dyna",
    kd_alpha: float = 0.5,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    eval_fraction: float = 0.1,
    output_dir: str | Path | None = None,
    save_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> FreeResult:
    """Fine-tune the whole decoder in ``model`` as FREE's shallow-deep module (module docstring).

    model: an HF causal LM, its HFDecoderBackbone, or a MultiExitModel over one (its ``lm``
        exit at ``shallow_layer``, if any, is the shallow read-out and trains too; its
        ``backbone_tuned`` is set so ``save_pretrained`` writes the backbone).
    texts: strings (with ``tokenizer``) or token-id lists, cut into ``seq_len`` windows;
        ``eval_fraction`` of them is held out for the shallow/deep agreement.
    shallow_layer: L_s (default: the MultiExitModel's single intermediate exit).
    kd, kd_alpha: the layer-distillation term and its weight. lr, warmup_steps, weight_decay,
        max_grad_norm: AdamW with linear warmup then linear decay to 0 over ``steps``.
    """
    _check_args(steps, lr, batch_size, seq_len, kd, kd_alpha, warmup_steps, save_every,
                max_grad_norm)
    backbone, multi, head, shallow_layer = _resolve(model, shallow_layer)
    lm, L = backbone.model, backbone.num_layers
    device = backbone.lm_head.weight.device
    from ..backbones.special_tokens import eos_and_pad

    _, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
    train_seqs, eval_seqs = split_holdout(
        tokenize_texts(texts, tokenizer, seq_len, backbone.vocab_size), eval_fraction, seed)
    # The model and the shallow head's own pieces, checkpointed together.
    trained = nn.ModuleDict({"lm": lm} if head is None else {"lm": lm, "head": head})
    params = list({id(p): p for p in trained.parameters()}.values())
    settings = {"num_layers": L, "shallow_layer": shallow_layer, "kd": kd,
                "kd_alpha": float(kd_alpha), "seed": seed, "batch_size": batch_size,
                "seq_len": seq_len, "lr": float(lr), "warmup_steps": warmup_steps,
                "total_steps": steps, "weight_decay": float(weight_decay),
                "max_grad_norm": max_grad_norm}
    saved_flags = [p.requires_grad for p in params]
    saved_modes = {m: m.training for m in (multi if multi is not None else trained).modules()}
    folder = Path(output_dir) / CKPT_DIR if output_dir is not None else None
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        trained.eval()
        state = load_checkpoint(folder, trained, optimizer, settings, device) if (
            folder is not None and resume) else None
        if state is None:
            state = {"settings": settings, "step": 0, "loss_history": [],
                     "ce_shallow_history": [], "ce_deep_history": [], "kd_history": [],
                     "agreement_before": shallow_deep_agreement(
                         backbone, head, shallow_layer, eval_seqs, pad_id, batch_size, device)}
        start = int(state["step"])
        bar = None
        if progress and start < steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc="free", leave=False)
        trained.train()
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup_steps)
            ids, mask = batch_at_step(train_seqs, step, batch_size, seed, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            shallow, deep, states = shallow_deep_forward(backbone, head, shallow_layer, ids, mask)
            parts = free_losses(shallow, deep, states, ids, mask, shallow_layer, kd, kd_alpha)
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            state["step"] = step + 1
            for key, name in (("total", "loss_history"), ("ce_shallow", "ce_shallow_history"),
                              ("ce_deep", "ce_deep_history"), ("kd", "kd_history")):
                state[name].append(float(parts[key].detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{state['loss_history'][-1]:.4f}")
            if folder is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
                save_checkpoint(folder, trained, optimizer, state, device)
        if bar is not None:
            bar.close()
        trained.eval()
        after = shallow_deep_agreement(backbone, head, shallow_layer, eval_seqs, pad_id,
                                       batch_size, device)
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for m, mode in saved_modes.items():
            m.training = mode
    if multi is not None:
        multi.backbone_tuned = True
    return FreeResult(
        num_layers=L, shallow_layer=shallow_layer, steps=int(state["step"]), start_step=start,
        loss_history=list(state["loss_history"]),
        ce_shallow_history=list(state["ce_shallow_history"]),
        ce_deep_history=list(state["ce_deep_history"]), kd_history=list(state["kd_history"]),
        agreement_before=float(state["agreement_before"]), agreement_after=after,
        num_train_sequences=len(train_seqs), num_eval_sequences=len(eval_seqs),
        output_dir=str(output_dir) if output_dir is not None else None,
    )

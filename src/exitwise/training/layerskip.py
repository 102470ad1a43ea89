"""LayerSkip (Elhoushi et al., ACL 2024): full fine-tuning that makes early layers good exits.

    result = layerskip_finetune(lm_or_model, texts, tokenizer, steps=1000, lr=2e-5,
                                p_max=0.1, curriculum="rotational", rotation_interval=4)
    ew.generate(model, ids, strategy="self_speculative", exit_layer=8)   # shared-head drafts

Unlike :func:`~exitwise.training.lm_tuning.tune_exits` the whole decoder trains. Two pieces:

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

``output_dir/layerskip/`` holds ``model.safetensors`` (the whole HF model), ``optimizer.
safetensors`` (optimizer tensors + RNG state) and ``state.json`` (step, histories, optimizer
scalars, settings), the last written last, so it marks a complete checkpoint. No pickle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from .checkpoint import (
    load_optimizer_state,
    load_unique_state_dict,
    optimizer_state,
    read_json,
    unique_state_dict,
    write_json_atomic,
)
from .lm_data import batch_at_step, pad_batch, split_holdout, tokenize_texts

DROPOUT_SCALES = ("exp", "linear")
CURRICULA = ("rotational", "gradual", "none")
CKPT_DIR = "layerskip"
STATE_NAME, WEIGHTS_NAME, OPTIM_NAME = "state.json", "model.safetensors", "optimizer.safetensors"


@dataclass
class LayerSkipResult:
    """What :func:`layerskip_finetune` did. Depths are 1-based (depth d = after block d-1).

    loss_history: weighted early-exit loss of every step (steps before a resume come from the
        checkpoint). exit_loss_history: per depth, its CE at every step (None when the
        curriculum had it off). agreement_before/after: per depth 1..L-1, share of held-out
        real tokens where the shared-head exit's top-1 equals the final layer's.
    """

    num_layers: int
    steps: int
    start_step: int
    dropout_rates: list[float]
    loss_history: list[float]
    exit_loss_history: dict[int, list[float | None]]
    agreement_before: dict[int, float]
    agreement_after: dict[int, float]
    num_train_sequences: int
    num_eval_sequences: int
    output_dir: str | None = None

    def table(self) -> str:
        rows = ["depth  drop_rate  agree_before  agree_after"]
        for d in range(1, self.num_layers):
            rows.append(f"{d:>5}  {self.dropout_rates[d - 1]:>9.3f}  "
                        f"{self.agreement_before[d]:>12.3f}  {self.agreement_after[d]:>11.3f}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    from ..backbones.hf_decoder import DecodeContext

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


# -- checkpoints (safetensors + JSON) ------------------------------------------------------
def save_checkpoint(
    folder: Path, lm: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    device: torch.device,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(unique_state_dict(lm), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    tensors, rest = optimizer_state(optimizer, device)
    save_file(tensors, str(folder / OPTIM_NAME), metadata={"format": "pt"})
    state = dict(state, optimizer=rest)
    write_json_atomic(folder / STATE_NAME, state, indent=1)  # last: marks a complete checkpoint


def load_checkpoint(
    folder: Path, lm: torch.nn.Module, optimizer: torch.optim.Optimizer,
    settings: dict[str, Any], device: torch.device,
) -> dict[str, Any] | None:
    state = read_json(folder / STATE_NAME)
    if state is None:
        return None
    if state.get("settings") != settings:
        raise CheckpointError(
            f"{folder} was saved with settings {state.get('settings')}, this run has {settings}; "
            "use another output_dir or resume=False"
        )
    load_unique_state_dict(lm, load_file(str(folder / WEIGHTS_NAME), device="cpu"),
                           str(folder / WEIGHTS_NAME))
    tensors = load_file(str(folder / OPTIM_NAME), device="cpu")
    load_optimizer_state(optimizer, tensors, state.pop("optimizer"), device)
    return state


# -- the recipe ----------------------------------------------------------------------------
def _resolve(model: Any) -> tuple[Any, Any]:
    """(HFDecoderBackbone, MultiExitModel or None) for a MultiExitModel, adapter or HF LM."""
    from ..backbones import HFDecoderBackbone, wrap_backbone
    from ..model import MultiExitModel

    multi = model if isinstance(model, MultiExitModel) else None
    try:
        backbone = multi.backbone if multi is not None else wrap_backbone(model)
    except UnsupportedModelError:
        backbone = None
    if not isinstance(backbone, HFDecoderBackbone):
        raise UnsupportedModelError(
            "layerskip_finetune needs a Hugging Face causal LM (AutoModelForCausalLM), its "
            "HFDecoderBackbone, or a MultiExitModel over one; got "
            f"{type(model).__name__}"
        )
    return backbone, multi


def _check_args(steps: Any, lr: Any, batch_size: Any, seq_len: Any, p_max: Any,
                dropout_scale: Any, early_exit_scale: Any, curriculum: Any,
                rotation_interval: Any, save_every: Any, warmup_steps: Any,
                eval_fraction: Any, max_grad_norm: Any) -> None:
    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name, v in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                    ("rotation_interval", rotation_interval), ("save_every", save_every)):
        if not pos_int(v):
            raise ConfigError(f"{name} must be a positive int; got {v!r}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 (a token and its successor); got {seq_len}")
    if not number(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive number; got {lr!r}")
    if not number(p_max) or not 0.0 <= p_max <= 1.0:
        raise ConfigError(f"p_max (the deepest layer's skip rate) must be in [0, 1]; got {p_max!r}")
    if dropout_scale not in DROPOUT_SCALES:
        raise ConfigError(
            f"dropout_scale must be one of {', '.join(DROPOUT_SCALES)}; got {dropout_scale!r}")
    if not number(early_exit_scale) or early_exit_scale < 0:
        raise ConfigError(f"early_exit_scale must be a number >= 0; got {early_exit_scale!r}")
    if curriculum not in CURRICULA:
        raise ConfigError(f"curriculum must be one of {', '.join(CURRICULA)}; got {curriculum!r}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}")
    if not number(eval_fraction) or not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1); got {eval_fraction!r}")
    if max_grad_norm is not None and (not number(max_grad_norm) or max_grad_norm <= 0):
        raise ConfigError(f"max_grad_norm must be a positive number or None; got {max_grad_norm!r}")


def layerskip_finetune(
    model: Any,
    texts: Sequence[Any],
    tokenizer: Any = None,
    *,
    steps: int = 1000,
    lr: float = 2e-5,
    batch_size: int = 8,
    seq_len: int = 256,
    p_max: float = 0.1,
    dropout_scale: str = "exp",
    early_exit_scale: float = 1.0,
    curriculum: str = "rotational",
    rotation_interval: int = 4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    eval_fraction: float = 0.1,
    output_dir: str | Path | None = None,
    save_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> LayerSkipResult:
    """Fine-tune the whole decoder LM in ``model`` with LayerSkip (module docstring).

    model: a MultiExitModel over an HF causal LM (its ``backbone_tuned`` is set, so
        ``save_pretrained`` writes the backbone), its HFDecoderBackbone, or the HF model.
        The exit loss reads every layer through the *shared* final norm + LM head; trainable
        adapters of attached exit heads are not trained here (tune them with ``tune_exits``).
    texts: strings (with ``tokenizer``) or token-id lists, cut into ``seq_len`` windows;
        ``eval_fraction`` of them (at least one) is held out to measure top-1 agreement.
    steps: total AdamW steps (T of the gradual curriculum; a resume continues up to it).
    lr: AdamW learning rate after a linear warmup of ``warmup_steps``; gradients clipped to
        ``max_grad_norm`` (None: no clipping).
    p_max, dropout_scale: the deepest block's skip rate and how rates rise with depth.
    early_exit_scale, curriculum, rotation_interval: the early-exit loss (e_scale, C, R).
    output_dir: checkpoints every ``save_every`` steps and at the end; with ``resume`` a
        complete checkpoint with the same settings is continued bit-identically.
    """
    _check_args(steps, lr, batch_size, seq_len, p_max, dropout_scale, early_exit_scale,
                curriculum, rotation_interval, save_every, warmup_steps, eval_fraction,
                max_grad_norm)
    backbone, multi = _resolve(model)
    lm, L = backbone.model, backbone.num_layers
    device = backbone.lm_head.weight.device
    from ..backbones.special_tokens import eos_and_pad

    _, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
    seqs = tokenize_texts(texts, tokenizer, seq_len, backbone.vocab_size)
    train_seqs, eval_seqs = split_holdout(seqs, eval_fraction, seed)
    rates = layer_dropout_rates(L, float(p_max), dropout_scale)
    settings = {
        "num_layers": L, "p_max": float(p_max), "dropout_scale": dropout_scale,
        "early_exit_scale": float(early_exit_scale), "curriculum": curriculum,
        "rotation_interval": rotation_interval, "seed": seed, "batch_size": batch_size,
        "seq_len": seq_len, "lr": float(lr), "warmup_steps": warmup_steps,
        "weight_decay": float(weight_decay), "max_grad_norm": max_grad_norm,
        "total_steps": steps if curriculum == "gradual" else None,  # T shapes the schedule
    }
    params = list(lm.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_modes = {m: m.training for m in (multi if multi is not None else lm).modules()}
    folder = Path(output_dir) / CKPT_DIR if output_dir is not None else None
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        lm.eval()
        state = load_checkpoint(folder, lm, optimizer, settings, device) if (
            folder is not None and resume) else None
        if state is None:
            state = {
                "settings": settings, "step": 0, "loss_history": [],
                "exit_loss_history": [[] for _ in range(L)],
                "agreement_before": layer_agreement(
                    backbone, eval_seqs, pad_id, batch_size, device),
            }
        start = int(state["step"])
        bar = None
        if progress and start < steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc="layerskip", leave=False)
        lm.train()  # the model's own dropout as configured, plus layer dropout below
        for step in range(start, steps):
            for group in optimizer.param_groups:  # stateless schedule: resume-safe
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            ids, mask = batch_at_step(train_seqs, step, batch_size, seed, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            # A generator per (seed, step): the layers skipped at a step do not depend on history.
            g = torch.Generator().manual_seed(seed * 7_919_993 + step + 1)
            drop = sample_layer_drops(rates, ids.shape[0], g)
            weights = early_exit_weights(
                early_exit_curriculum(curriculum, step, L, steps, rotation_interval),
                early_exit_scale,
            )
            on = [l for l in range(L) if weights[l] > 0]
            hiddens = layerskip_forward(backbone, ids, mask, drop, on)
            losses = {l: next_token_ce(backbone.lm_logits(backbone.final_norm(hiddens[l])), ids,
                                       mask) for l in on}
            total = sum(weights[l].to(device) * losses[l] for l in on)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            state["step"] = step + 1
            state["loss_history"].append(float(total.detach()))
            for l in range(L):
                state["exit_loss_history"][l].append(
                    float(losses[l].detach()) if l in losses else None)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(total.detach()):.4f}")
            if folder is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
                save_checkpoint(folder, lm, optimizer, state, device)
        if bar is not None:
            bar.close()
        lm.eval()
        after = layer_agreement(backbone, eval_seqs, pad_id, batch_size, device)
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)
        for m, mode in saved_modes.items():
            m.training = mode
    if multi is not None:
        multi.backbone_tuned = True
    return LayerSkipResult(
        num_layers=L,
        steps=int(state["step"]),
        start_step=start,
        dropout_rates=rates.tolist(),
        loss_history=list(state["loss_history"]),
        exit_loss_history={l + 1: list(h) for l, h in enumerate(state["exit_loss_history"])},
        agreement_before={d: state["agreement_before"][d - 1] for d in range(1, L)},
        agreement_after={d: after[d - 1] for d in range(1, L)},
        num_train_sequences=len(train_seqs),
        num_eval_sequences=len(eval_seqs),
        output_dir=str(output_dir) if output_dir is not None else None,
    )

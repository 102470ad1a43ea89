"""Exit-head tuning for decoder LMs (EE-Tuning, Pan et al. 2024), with a frozen backbone.

    model = ew.attach_exits(lm, ew.ExitConfig(layers=[6], head="lm", num_labels=vocab,
                                              head_kwargs={"adapter": "norm"},
                                              final_head_kwargs={}))
    result = tune_exits(model, texts, tokenizer, steps=500, output_dir="runs/ee")
    result.agreement_after     # {6: 0.71}: top-1 agreement of exit 6 with the final layer

Each batch runs the frozen backbone once (no grad) over whole right-padded sequences; after
every block that carries an exit, that exit's ``lm`` head turns the hidden states into logits
at all positions (``token_logits``, with the backbone's context so a ``block`` / ``kangaroo``
adapter attends causally). The loss per exit, averaged over real tokens, is

- ``"ce"`` (default, EE-Tuning's objective): the autoregressive cross-entropy of the exit on
  the text's next token, averaged over real positions whose next token is real;
- ``"kl"``:    KL(p_final || p_exit): self-distillation to the model's own final layer
  (its own final norm + LM head), as LayerSkip-style self-speculation wants;
- ``"kl+ce"``: their sum;

and the exits' losses are averaged. Only the trainable pieces of the intermediate exits'
heads (adapter / own norm / untied LM head) get gradients; ``requires_grad`` of every
parameter is restored afterwards.

Reference: EE-Tuning's stage 2 in the authors' EE-LLM (pan-x-c/EE-LLM), where each exit's loss
is the language-modeling cross-entropy on the labels (``megatron/model/early_exit_gpt_model.py``,
``post_language_model_processing`` -> ``vocab_parallel_cross_entropy``), averaged over the
loss mask (``pretrain_early_exit_gpt.py``, ``loss_func``), with the backbone frozen.

Deviations: the exits' losses are averaged (EE-LLM sums them with per-exit weights
``--exit-layer-weight``; with equal weights this is the same objective scaled by 1 / exits);
EE-LLM's optional confidence-weighted loss (``--use-dynamic-exit-layer-weight``) is not
implemented; ``"kl"`` / ``"kl+ce"`` are exitwise options, not EE-Tuning's. The optimizer is
AdamW with a linear warmup to a constant rate (EE-LLM's scripts warm up, then decay to a
minimum rate).

``output_dir/lm_tuning/`` holds ``heads.safetensors``, ``optimizer.safetensors`` (the
optimizer's tensors and the random state; no pickle) and ``state.json`` (step, loss history,
agreement before tuning, the optimizer's other values), the last written last, so it marks a
complete checkpoint.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from .checkpoint import load_optimizer_state, optimizer_state, read_json, write_json_atomic
from .draft_vocab import set_draft_vocabularies
from .lm_data import (
    batch_at_step,
    pad_batch,
    self_generated_sequences,
    split_holdout,
    tokenize_texts,
)

LOSSES = ("kl", "ce", "kl+ce")
CKPT_DIR = "lm_tuning"
STATE_NAME, WEIGHTS_NAME, OPTIM_NAME = "state.json", "heads.safetensors", "optimizer.safetensors"


@dataclass
class LMTuningResult:
    """What :func:`tune_exits` did.

    loss_history: the mean training loss of every step, 0-based (steps before a resume come
        from the checkpoint).
    exit_loss_history: per exit depth, its own loss at every step.
    agreement_before / agreement_after: per exit depth, the fraction of held-out real tokens
        where the exit's top-1 token equals the final layer's.
    """

    exit_layers: list[int]
    steps: int
    start_step: int
    loss: str
    loss_history: list[float]
    exit_loss_history: dict[int, list[float]]
    agreement_before: dict[int, float]
    agreement_after: dict[int, float]
    num_train_sequences: int
    num_eval_sequences: int
    self_generated: bool = False
    reused_generation_cache: bool = False
    output_dir: str | None = None

    def table(self) -> str:
        rows = ["exit  agree_before  agree_after"]
        for d in self.exit_layers:
            before, after = self.agreement_before[d], self.agreement_after[d]
            rows.append(f"{d:>4}  {before:>12.3f}  {after:>11.3f}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- validation ----------------------------------------------------------------------------
def tuned_exits(model: Any) -> list[int]:
    """Indices of the intermediate ``lm`` exits (the final layer is the teacher, not tuned)."""
    from ..backbones.hf_decoder import HFDecoderBackbone
    from ..heads.lm import LMHead
    from ..model import MultiExitModel

    if not isinstance(model, MultiExitModel) or not isinstance(model.backbone, HFDecoderBackbone):
        raise UnsupportedModelError(
            "tune_exits needs a MultiExitModel over a Hugging Face causal LM, made with "
            "ew.attach_exits(lm, ew.ExitConfig(layers=[...], head='lm', num_labels=vocab))"
        )
    last = model.backbone.num_layers
    ks = [
        k for k, d in enumerate(model.exit_layers)
        if d < last and isinstance(model.heads[k], LMHead)
    ]
    if not ks:
        raise ConfigError(
            f"this model has no intermediate 'lm' exit to tune (exits {model.exit_layers}, "
            f"heads {[type(h).__name__ for h in model.heads]}); attach exits with head='lm'"
        )
    empty = [model.exit_layers[k] for k in ks if not any(True for _ in model.heads[k].parameters())]
    if empty:
        raise ConfigError(
            f"the 'lm' exits at layers {empty} have nothing to train (adapter='none', tied): "
            "use head_kwargs={'adapter': 'norm'|'mlp'|'block'|'kangaroo'} or {'untied': True}"
        )
    return ks


def _check_args(steps: Any, lr: Any, batch_size: Any, seq_len: Any, loss: str,
                num_generations: Any, gen_tokens: Any, save_every: Any) -> None:
    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not pos_int(steps):
        raise ConfigError(f"steps must be a positive int; got {steps!r}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len),
                    ("num_generations", num_generations), ("gen_tokens", gen_tokens),
                    ("save_every", save_every)):
        if not pos_int(v):
            raise ConfigError(f"{name} must be a positive int; got {v!r}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 (a token and its successor); got {seq_len}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"lr must be a positive number; got {lr!r}")
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


# -- forward and losses --------------------------------------------------------------------
def exit_and_final_logits(
    model: Any, ks: list[int], ids: torch.Tensor, mask: torch.Tensor, grad: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One pass over the frozen backbone: ([(B, T, K) per tuned exit], final (B, T, V)).

    The backbone runs without grad; each exit head runs with grad when ``grad``. K = V, or a
    head's draft-vocabulary size (its logits over ``vocab_ids`` only; see
    :func:`exit_vocab_ids`).
    """
    backbone = model.backbone
    depth_to_k = {model.exit_layers[k]: k for k in ks}
    exits: list[torch.Tensor] = []
    with torch.no_grad():
        state = backbone.start(input_ids=ids, attention_mask=mask)
    for i in range(backbone.num_layers):
        with torch.no_grad():
            state = backbone.step(i, state)
        k = depth_to_k.get(i + 1)
        if k is not None:
            hidden, _ = backbone.features(state)
            with torch.set_grad_enabled(grad):
                exits.append(model.heads[k].compact_logits(hidden, state.shared["ctx"]))
    with torch.no_grad():
        final = backbone.lm_logits(backbone.final_norm(state.hidden))
    return exits, final


def exit_vocab_ids(model: Any, ks: list[int]) -> list[torch.Tensor | None]:
    """Per tuned exit: its draft vocabulary ids (K,), or None when it reads out all V."""
    return [getattr(model.heads[k], "vocab_ids", None) for k in ks]


def exit_losses(
    exits: list[torch.Tensor], final: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
    loss: str, vocab_ids: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """(num_exits,) losses, each averaged over real tokens (CE: over real tokens whose next
    token is real too). Computed in float32.

    An exit with a draft vocabulary (``vocab_ids[j]``, K ids) is distilled towards the final
    layer's distribution restricted to those K ids and renormalised (the best a K-way draft
    can do), and its CE counts only targets inside the subset.
    """
    real = mask.bool()
    final_real = final.float()[real]  # (N, V)
    teacher_full = F.log_softmax(final_real, -1) if "kl" in loss else None
    nxt = real[:, :-1] & real[:, 1:]  # (B, T-1): positions with a next token
    targets = ids[:, 1:][nxt]
    out = []
    for j, logits in enumerate(exits):
        sub = vocab_ids[j] if vocab_ids is not None else None
        total = logits.new_zeros((), dtype=torch.float32)
        if "kl" in loss:
            teacher = teacher_full if sub is None else F.log_softmax(final_real[:, sub], -1)
            student = F.log_softmax(logits.float()[real], -1)
            total = total + F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        if "ce" in loss:
            step_logits = logits.float()[:, :-1][nxt]
            tgt = targets
            if sub is not None:  # position of each target in the subset, -100 if outside
                where = torch.full((final.shape[-1],), -100, dtype=torch.long, device=sub.device)
                where[sub] = torch.arange(sub.numel(), device=sub.device)
                tgt = where[targets]
            if bool((tgt >= 0).any()):
                total = total + F.cross_entropy(step_logits, tgt, ignore_index=-100)
        out.append(total)
    return torch.stack(out)


@torch.no_grad()
def top1_agreement(
    model: Any, ks: list[int], seqs: list[list[int]], pad_id: int, batch_size: int,
    device: torch.device,
) -> list[float]:
    """Per tuned exit: share of real tokens of ``seqs`` where its argmax equals the final's."""
    hits = torch.zeros(len(ks), dtype=torch.float64)
    count = 0
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[s : s + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        exits, final = exit_and_final_logits(model, ks, ids, mask, grad=False)
        real = mask.bool()
        top = final.argmax(-1)[real]
        for j, logits in enumerate(exits):
            hits[j] += (model.heads[ks[j]].compact_argmax(logits)[real] == top).sum().item()
        count += int(real.sum())
    return (hits / max(count, 1)).tolist()


# -- checkpoints ---------------------------------------------------------------------------
def _head_tensors(model: Any, ks: list[int]) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{name}": t.detach().contiguous().cpu()
        for k in ks for name, t in model.heads[k].state_dict().items()
    }


def save_checkpoint(
    folder: Path, model: Any, ks: list[int], optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_head_tensors(model, ks), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    tensors, rest = optimizer_state(optimizer)  # no pickle: safetensors + the JSON below
    save_file(tensors, str(folder / OPTIM_NAME), metadata={"format": "pt"})
    state = dict(state, optimizer=rest)
    write_json_atomic(folder / STATE_NAME, state, indent=1)  # last: marks a complete checkpoint


def load_checkpoint(
    folder: Path, model: Any, ks: list[int], optimizer: torch.optim.Optimizer,
    exit_layers: list[int],
) -> dict[str, Any] | None:
    state = read_json(folder / STATE_NAME)
    if state is None:
        return None
    if "optimizer" not in state:
        raise CheckpointError(
            f"{folder} was written by an older exitwise (optimizer state pickled in "
            "optimizer.pt, no longer read); use another output_dir or resume=False"
        )
    if state.get("exit_layers") != exit_layers:
        raise CheckpointError(
            f"{folder} was saved for exits {state.get('exit_layers')}, this model tunes "
            f"{exit_layers}; use another output_dir or resume=False"
        )
    tensors = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    own = _head_tensors(model, ks)
    if set(tensors) != set(own) or any(tensors[n].shape != own[n].shape for n in own):
        raise CheckpointError(f"{folder / WEIGHTS_NAME} does not fit these exit heads")
    for k in ks:
        prefix = f"{k}."
        model.heads[k].load_state_dict(
            {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        )
    load_optimizer_state(optimizer, load_file(str(folder / OPTIM_NAME), device="cpu"),
                         state.pop("optimizer"))
    return state


# -- shared by the LM exit recipes ---------------------------------------------------------
@contextmanager
def only_training(model: Any, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` require grad; every parameter's ``requires_grad`` and
    every module's train/eval mode are restored afterwards (also on error)."""
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    saved_modes = {m: m.training for m in model.modules()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(saved_flags[id(p)])
        for m, mode in saved_modes.items():
            m.training = mode


def record_step(
    state: dict[str, Any], step: int, total: float, per_exit: list[float], bar: Any,
    folder: Path | None, save_every: int, steps: int, model: Any, ks: list[int],
    optimizer: torch.optim.Optimizer,
) -> None:
    """After optimizer step ``step`` (0-based): histories, progress bar, and a checkpoint every
    ``save_every`` steps and at the last one."""
    state["step"] = step + 1
    state["loss_history"].append(total)
    for j, v in enumerate(per_exit):
        state["exit_loss_history"][j].append(v)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
    if folder is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
        save_checkpoint(folder, model, ks, optimizer, state)


# -- the recipe ----------------------------------------------------------------------------
def tune_exits(
    model: Any,
    texts: Sequence[Any] | None = None,
    tokenizer: Any = None,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 8,
    seq_len: int = 128,
    loss: str = "ce",
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    self_generate_prompts: Sequence[Any] | None = None,
    num_generations: int = 1,
    gen_tokens: int = 64,
    eval_fraction: float = 0.1,
    output_dir: str | Path | None = None,
    save_every: int = 50,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> LMTuningResult:
    """Tune the intermediate ``lm`` exit heads of ``model`` against its own final layer.

    texts: strings (with ``tokenizer``) or token-id lists; each is cut into ``seq_len``
        windows. None: self-distillation data from the model's own continuations of
        ``self_generate_prompts`` (default: ~20 built-in prompts; strings need ``tokenizer``,
        id lists do not), ``num_generations`` per prompt (the first greedy, the rest sampled),
        ``gen_tokens`` new tokens each, cached in ``output_dir``.
    steps: total optimizer steps (a resumed run continues up to this many).
    lr: AdamW learning rate, reached after a linear warmup of ``warmup_steps`` (a fixed count, so a
        resumed run with more ``steps`` keeps the schedule; a zero-initialised adapter
        otherwise overshoots on its first steps).
    loss: "ce" (default, EE-Tuning's next-token cross-entropy) | "kl" (distillation to the
        final layer) | "kl+ce" (see module docstring).
    eval_fraction: share of sequences held out to measure top-1 agreement before/after.
    output_dir: checkpoints every ``save_every`` steps and at the end; with ``resume`` a
        complete checkpoint there is continued from its step.
    """
    _check_args(steps, lr, batch_size, seq_len, loss, num_generations, gen_tokens, save_every)
    ks = tuned_exits(model)
    backbone = model.backbone
    depths = [model.exit_layers[k] for k in ks]
    device = backbone.lm_head.weight.device
    from ..backbones.special_tokens import eos_and_pad

    eos, pad_id = eos_and_pad(backbone, None, getattr(tokenizer, "pad_token_id", None))
    out_dir = Path(output_dir) if output_dir is not None else None

    reused = False
    if texts is None:
        seqs, reused = self_generated_sequences(
            model, tokenizer, self_generate_prompts, num_generations, gen_tokens, seed, pad_id,
            eos, out_dir,
        )
        seqs = tokenize_texts(seqs, None, seq_len, backbone.vocab_size)
    else:
        seqs = tokenize_texts(texts, tokenizer, seq_len, backbone.vocab_size)
    train_seqs, eval_seqs = split_holdout(seqs, eval_fraction, seed)

    params = [p for k in ks for p in model.heads[k].parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = warmup_steps
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"warmup_steps must be >= 0; got {warmup_steps!r}")
    folder = out_dir / CKPT_DIR if out_dir is not None else None
    with only_training(model, params):
        model.eval()  # frozen backbone: no dropout in the teacher; heads train below
        state = load_checkpoint(folder, model, ks, optimizer, depths) if (
            folder is not None and resume) else None
        if state is None:
            # Draft vocabularies come from the training sequences, before any step.
            set_draft_vocabularies(model, ks, train_seqs, pad_id, batch_size)
            before = top1_agreement(model, ks, eval_seqs, pad_id, batch_size, device)
            state = {
                "exit_layers": depths, "step": 0, "loss_history": [],
                "exit_loss_history": [[] for _ in ks], "agreement_before": before,
                "loss": loss, "seed": seed,
            }
        start = int(state["step"])
        bar = None
        if progress and start < steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc="tune_exits", leave=False)
        for step in range(start, steps):
            for k in ks:
                model.heads[k].train()
            for group in optimizer.param_groups:  # stateless schedule: resume-safe
                group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            ids, mask = batch_at_step(train_seqs, step, batch_size, seed, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            exits, final = exit_and_final_logits(model, ks, ids, mask, grad=True)
            per_exit = exit_losses(exits, final, ids, mask, loss, exit_vocab_ids(model, ks))
            total = per_exit.mean()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            record_step(state, step, float(total.detach()), per_exit.tolist(), bar, folder,
                        save_every, steps, model, ks, optimizer)
        if bar is not None:
            bar.close()
        model.eval()
        after = top1_agreement(model, ks, eval_seqs, pad_id, batch_size, device)
    return LMTuningResult(
        exit_layers=depths,
        steps=int(state["step"]),
        start_step=start,
        loss=loss,
        loss_history=list(state["loss_history"]),
        exit_loss_history={d: list(h) for d, h in zip(depths, state["exit_loss_history"])},
        agreement_before=dict(zip(depths, state["agreement_before"])),
        agreement_after=dict(zip(depths, after)),
        num_train_sequences=len(train_seqs),
        num_eval_sequences=len(eval_seqs),
        self_generated=texts is None,
        reused_generation_cache=reused,
        output_dir=str(out_dir) if out_dir is not None else None,
    )

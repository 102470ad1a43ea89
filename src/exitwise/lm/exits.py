"""The intermediate ``lm`` exits of a multi-exit decoder LM, read on whole sequences.

Shared by the objectives that train exit heads on a frozen backbone and by the draft
vocabulary: which exits are tuned, one pass giving their logits beside the final layer's, and
the held-out top-1 agreement of each exit with the final layer.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbones import HFDecoderBackbone
from ..errors import ConfigError, UnsupportedModelError
from ..heads.lm import LMHead
from .data import pad_batch


def tuned_exits(model: Any) -> list[int]:
    """Indices (into ``model.heads``) of the intermediate ``lm`` exits that have parameters;
    the final layer is the teacher, never tuned."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, HFDecoderBackbone) or not hasattr(model, "heads"):
        raise UnsupportedModelError(
            "exit tuning needs a MultiExitModel over a Hugging Face causal LM, made with "
            "ew.attach_exits(lm, ew.ExitConfig(layers=[...], head='lm', num_labels=vocab))"
        )
    last = backbone.num_layers
    ks = [k for k, d in enumerate(model.exit_layers)
          if d < last and isinstance(model.heads[k], LMHead)]
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


def exit_and_final_logits(
    model: Any, ks: list[int], ids: torch.Tensor, mask: torch.Tensor, grad: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One pass over the frozen backbone: ([(B, T, K) per exit in ``ks``], final (B, T, V)).

    The backbone runs without grad; each exit head runs with grad when ``grad``. K = V, or a
    head's draft-vocabulary size (its logits over its ``vocab_ids`` only).
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
    """Per exit in ``ks``: its draft vocabulary ids (K,), or None when it reads out all V."""
    return [getattr(model.heads[k], "vocab_ids", None) for k in ks]


def vocab_positions(vocab_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """(V,) long: the position of each token id inside a draft vocabulary, -100 for ids
    outside it (the ignore index of cross-entropy); None for a full read-out."""
    if vocab_ids is None:
        return None
    where = torch.full((vocab_size,), -100, dtype=torch.long, device=vocab_ids.device)
    where[vocab_ids] = torch.arange(vocab_ids.numel(), device=vocab_ids.device)
    return where


@torch.no_grad()
def top1_agreement(
    model: Any, ks: list[int], seqs: list[list[int]], pad_id: int, batch_size: int,
    device: torch.device,
) -> list[float]:
    """Per exit in ``ks``: share of real tokens of ``seqs`` where its argmax equals the final
    layer's."""
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

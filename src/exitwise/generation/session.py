"""Book-keeping shared by the decoders: one KV cache for a batch of prompts.

The cache has one slot per column of ``mask``. A slot is real (1) or not (0): left padding of
the prompts, or a *hole* left by a draft token one row rejected while another row of the same
batch accepted more. Every row carries its own position ids (``slot_pos``, ``next_pos``), so
RoPE angles and learned positions count real tokens only, whatever the holes.

Shapes: A active rows (finished rows are dropped from the batch, the cache included), S cache
slots, T prompt length, V vocab.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..backbones.hf_decoder import DecodeContext, HFDecoderBackbone, prompt_positions
from ..heads.lm import last_real
from .outputs import GenerationStats


class DecodeSession:
    """State of one batched decoding run.

    rows:     (A,) original row index of each active row.
    mask:     (A, S) 1 real slot, 0 padding or hole.
    slot_pos: (A, S) position id of each slot.
    next_pos: (A,) position id of the pending token.
    pending:  (A,) the last token the full model chose; not yet in the cache.
    slot_tokens: (A, S) token id in each slot (holes keep their rejected draft).
    final_hidden: (A, H) the last block's output (before the final norm) at the position that
        chose ``pending`` (set by the prefill and by decoders that keep it up to date; read
        by feature-conditioned draft exits).

    keep_finished: keep finished rows in the batch (as ``model.generate`` does) instead of
        dropping them; their further tokens are not emitted. Used to inspect the final cache.
    """

    def __init__(
        self,
        backbone: HFDecoderBackbone,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_ids: set[int],
        pad_id: int,
        stats: GenerationStats,
        keep_finished: bool = False,
    ) -> None:
        self.backbone = backbone
        self.prompt = input_ids
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.stats = stats
        self.keep_finished = keep_finished
        device = input_ids.device
        b = input_ids.shape[0]
        self.rows = torch.arange(b, device=device)
        self.cache = backbone.new_cache()
        self.mask = attention_mask.long()
        self.slot_pos = prompt_positions(self.mask)
        self.slot_tokens = input_ids.long()
        self.next_pos = self.mask.sum(1)
        self.pending = torch.zeros(b, dtype=torch.long, device=device)
        self.final_hidden: torch.Tensor | None = None
        self.generated: list[list[int]] = [[] for _ in range(b)]
        self.done = [False] * b

    # -- facts ------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Rows in the batch (finished ones too when ``keep_finished``)."""
        return int(self.rows.numel())

    @property
    def unfinished(self) -> bool:
        return not all(self.done[r] for r in self.rows.tolist())

    def running(self) -> list[bool]:
        """(A,) per active row: still generating."""
        return [not self.done[r] for r in self.rows.tolist()]

    def remaining(self) -> torch.Tensor:
        """(A,) tokens each active row may still emit."""
        left = [self.max_new_tokens - len(self.generated[r]) for r in self.rows.tolist()]
        return torch.tensor(left, dtype=torch.long)

    # -- running the model ------------------------------------------------------------------
    def prefill(
        self,
        split: int | None = None,
        on_split: Callable[[torch.Tensor, DecodeContext], None] | None = None,
    ) -> torch.Tensor:
        """Run every block on the prompts, filling the cache; return the full model's logits
        at each row's last real token (A, V). ``on_split(hidden (A, T, H), ctx)`` sees the
        hidden state after ``split`` blocks (used by exit heads that keep their own cache)."""
        bb = self.backbone
        ctx = DecodeContext(self.cache, self.slot_pos, self.mask, self.slot_pos)
        ids = self.prompt.long().clamp(0, bb.vocab_size - 1)  # pad ids may be out of range
        hidden = bb.embed(ids, self.slot_pos)
        if split is not None:
            hidden = bb.run_layers(hidden, 0, split, ctx)
            if on_split is not None:
                on_split(hidden, ctx)
            hidden = bb.run_layers(hidden, split, bb.num_layers, ctx)
        else:
            hidden = bb.run_layers(hidden, 0, bb.num_layers, ctx)
        self.stats.prefill_layer_applications = int(self.mask.sum()) * bb.num_layers
        last = last_real(hidden, self.mask)
        self.final_hidden = last
        return bb.lm_logits(bb.final_norm(last))

    def context(self, first: int, count: int, tree: Any = None) -> DecodeContext:
        """Context for ``count`` new tokens at offsets first..first+count-1 past the cache's
        committed slots, every new slot real (the slots before ``first`` were written by
        earlier calls of the same step). With ``tree`` (a :class:`~.token_tree.ChainTree`),
        the step's slots hold its nodes: slot i sits at position next_pos + depth(i) and a
        new token attends to the committed slots and its own ancestors only."""
        device = self.mask.device
        width = first + count
        if tree is None:
            offsets, ancestors = torch.arange(width, device=device), None
        else:
            depths, ancestors = tree.layout(device)
            offsets = depths[:width]
        new = torch.ones(self.active, width, dtype=torch.long, device=device)
        mask = torch.cat([self.mask, new], 1)
        slot_pos = torch.cat([self.slot_pos, self.next_pos[:, None] + offsets], 1)
        return DecodeContext(self.cache, slot_pos[:, -count:], mask, slot_pos,
                             tree=ancestors, tree_start=self.mask.shape[1])

    def keep_step_slots(self, index: torch.Tensor) -> None:
        """Keep, of the slots the current step wrote into every cache layer (all past the
        committed ones), the m slots ``index`` (A, m) per row, in that order; the rest are
        dropped (token trees: the accepted path's slots move to the front)."""
        start = self.mask.shape[1]
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", True) or getattr(layer, "keys", None) is None:
                continue
            for name in ("keys", "values"):
                t = getattr(layer, name)  # (A, heads, S + n, d)
                idx = index[:, None, :, None].expand(t.shape[0], t.shape[1], -1, t.shape[3])
                setattr(layer, name, torch.cat([t[:, :, :start], t[:, :, start:].gather(2, idx)],
                                               2))

    def commit(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        advance: torch.Tensor,
        pending: torch.Tensor,
    ) -> None:
        """Record the slots a step kept: tokens (A, m) fed into the m new slots left in the
        cache, valid (A, m) 1 real / 0 hole; advance (A,) real tokens added per row; pending
        (A,) the next input token."""
        offsets = torch.arange(valid.shape[1], device=valid.device)
        self.slot_tokens = torch.cat([self.slot_tokens, tokens.long()], 1)
        self.mask = torch.cat([self.mask, valid.long()], 1)
        self.slot_pos = torch.cat([self.slot_pos, self.next_pos[:, None] + offsets], 1)
        self.next_pos = self.next_pos + advance
        self.pending = pending

    # -- output -----------------------------------------------------------------------------
    def emit(self, tokens: list[list[int]]) -> None:
        """Append each active row's new tokens, stopping a row at EOS, at its budget or when
        :meth:`stops` says so; then hand what each row committed to :meth:`committed`."""
        for r, new in zip(self.rows.tolist(), tokens):
            out = self.generated[r]
            start = len(out)
            for t in new:
                if self.done[r]:
                    break
                out.append(int(t))
                if int(t) in self.eos_ids or len(out) >= self.max_new_tokens or self.stops(out):
                    self.done[r] = True
            if len(out) > start:
                self.committed(r, out[start:])

    def stops(self, generated: list[int]) -> bool:
        """Extra stop condition on a row's generated ids (stop strings); none here."""
        return False

    def committed(self, row: int, tokens: list[int]) -> None:
        """Called with the tokens ``row`` just committed (streaming); nothing here."""

    def drop_finished(self) -> None:
        """Remove finished rows from the batch and from every cache layer."""
        keep = [a for a, r in enumerate(self.rows.tolist()) if not self.done[r]]
        if self.keep_finished or len(keep) == self.active:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        if keep:
            self.cache.batch_select_indices(idx)
        self.rows = self.rows[idx]
        self.mask = self.mask[idx]
        self.slot_pos = self.slot_pos[idx]
        self.slot_tokens = self.slot_tokens[idx]
        self.next_pos = self.next_pos[idx]
        self.pending = self.pending[idx]
        if self.final_hidden is not None:
            self.final_hidden = self.final_hidden[idx]

    def sequences(self) -> torch.Tensor:
        """(B, T + N): prompts followed by the generated tokens, padded with the pad id."""
        b, t = self.prompt.shape
        n = max((len(g) for g in self.generated), default=0)
        out = torch.full((b, t + n), self.pad_id, dtype=torch.long, device=self.prompt.device)
        out[:, :t] = self.prompt
        for r, gen in enumerate(self.generated):
            if gen:
                out[r, t : t + len(gen)] = torch.tensor(gen, dtype=torch.long)
        self.stats.new_tokens = [len(g) for g in self.generated]
        return out

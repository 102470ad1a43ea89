"""A timed decoding pass of a whole decoder, for the end-to-end kernel check.

:mod:`exitwise.backbones.kernels` chooses per weight shape whether a few-row product streams;
products that win alone can lose inside a whole pass (caches, the per-call cost of rerouting).
:class:`DecoderStackProbe` is what it times to check that: ``probe(rows)`` runs ``rows`` new
tokens through every block, the final norm and the LM head on top of a cache of
``context`` tokens, exactly the calls of a verification step at batch 1 (or of a plain step
at batch ``rows``: the products see the same number of rows), and returns the seconds the pass
took. The cache is filled once and copied before each pass, untimed, so every pass sees the
same context.
"""

from __future__ import annotations

import copy
import hashlib
import time

import torch

from .hf_decoder import DecodeContext, HFDecoderBackbone


class DecoderStackProbe:
    """``probe(rows) -> seconds`` of one pass of ``rows`` new tokens (batch 1) through the
    whole of ``backbone`` after ``context`` cached tokens (fewer when the model has fewer
    positions). ``key`` names the architecture, its shapes and dtype, and the context."""

    def __init__(self, backbone: HFDecoderBackbone, context: int = 64, max_rows: int = 8) -> None:
        self.backbone = backbone
        limit = backbone.max_positions
        self.context = context if limit is None else max(1, min(context, limit - max_rows))
        shapes = sorted(
            (name, tuple(p.shape), str(p.dtype)) for name, p in backbone.model.named_parameters())
        digest = hashlib.sha1(repr(shapes).encode()).hexdigest()[:12]
        self.key = f"{type(backbone.model).__name__}:{backbone.num_layers}L:{digest}:c{self.context}"
        self.device = next(backbone.model.parameters()).device
        self._cache = None
        self._gen = torch.Generator().manual_seed(0)

    @torch.inference_mode()
    def _prefilled(self):
        if self._cache is None:
            bb = self.backbone
            device = self.device
            ids = torch.randint(0, bb.vocab_size, (1, self.context), generator=self._gen)
            ids = ids.to(device)
            mask = torch.ones_like(ids)
            pos = torch.arange(self.context, device=device)[None]
            cache = bb.new_cache()
            bb.run_layers(bb.embed(ids, pos), 0, bb.num_layers, DecodeContext(cache, pos, mask, pos))
            self._cache = cache
        return self._cache

    @torch.inference_mode()
    def __call__(self, rows: int) -> float:
        bb = self.backbone
        cache = copy.deepcopy(self._prefilled())
        base = self.context
        device = self.device
        ids = torch.randint(0, bb.vocab_size, (1, rows), generator=self._gen).to(device)
        slots = torch.arange(base + rows, device=device)[None]
        mask = torch.ones(1, base + rows, dtype=torch.long, device=device)
        ctx = DecodeContext(cache, slots[:, base:], mask, slots)
        t0 = time.perf_counter()
        hidden = bb.run_layers(bb.embed(ids, ctx.positions), 0, bb.num_layers, ctx)
        bb.lm_logits(bb.final_norm(hidden))
        return time.perf_counter() - t0

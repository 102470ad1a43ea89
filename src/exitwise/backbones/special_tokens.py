"""End-of-sequence and padding ids of a decoder LM, resolved once for every user (decoding,
exit tuning, answer generation, LayerSkip, FREE, CALM's classifier), in the order
``generate`` uses: the explicit argument, then the model's generation config, then its config
(then, where one is given, the tokenizer); padding falls back to the first EOS id."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..errors import ConfigError


def token_ids(value: Any, name: str) -> list[int]:
    """An id or ids (int, list, tensor) as a list of ints; [] for None."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"{name} must be an int or a list of ints; got {value!r}")
    return [int(v) for v in value]


def eos_id_list(model: Any, tokenizer: Any = None, eos_token_id: Any = None,
                config: Any = None) -> list[int]:
    """EOS ids of a Hugging Face causal LM ``model``, in the order given: ``eos_token_id``
    when given, else its generation config's, its config's (``config``, default
    ``model.config``), or the tokenizer's."""
    if eos_token_id is None:
        config = getattr(model, "config", None) if config is None else config
        for source in (getattr(model, "generation_config", None), config, tokenizer):
            eos_token_id = getattr(source, "eos_token_id", None)
            if eos_token_id is not None:
                break
    return token_ids(eos_token_id, "eos_token_id")


def eos_ids(model: Any, tokenizer: Any = None, eos_token_id: Any = None) -> set[int]:
    """:func:`eos_id_list` as a set (what decoding stops on)."""
    return set(eos_id_list(model, tokenizer, eos_token_id))


def eos_and_pad(backbone: Any, eos_token_id: Any = None, pad_token_id: Any = None
                ) -> tuple[set[int], int]:
    """(EOS ids, pad id) of ``backbone`` (an HFDecoderBackbone: ``.model``, ``.config``)."""
    gen = getattr(backbone.model, "generation_config", None)
    cfg = backbone.config
    eos = eos_id_list(backbone.model, None, eos_token_id, config=cfg)
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(cfg, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    pad = token_ids(pad_token_id, "pad_token_id")
    return set(eos), pad[0]

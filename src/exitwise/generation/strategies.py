"""Decoding strategies registered by name, each with its own options, and the options every
strategy shares (:class:`GenerationConfig`), as transformers' generation config and candidate
generators.

    config = GenerationConfig(max_new_tokens=64)
    strategy = get_decoding_strategy("self_speculative", exit_layer=2, draft_len=1)
    out = generate(model, ids, mask, config, strategy=strategy)   # or strategy="greedy"

A strategy is a dataclass of its options, registered with
:func:`register_decoding_strategy`; it checks its options when made and refuses options it
does not have, naming the strategy that does. :meth:`DecodingStrategy.decode` runs it on a
:class:`DecodeInputs` that :func:`exitwise.generation.generate` has validated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..backbones.hf_decoder import HFDecoderBackbone
from ..errors import ConfigError
from ..registry import Registry
from .outputs import GenerateOutput, GenerationStats
from .sampling import SamplingConfig
from .stopping import StopStrings, StreamingSession, TokenCallback

DECODING_STRATEGIES: Registry[type[DecodingStrategy]] = Registry("decoding strategy")
# Class decorator: @register_decoding_strategy("name").
register_decoding_strategy = DECODING_STRATEGIES.register


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationConfig:
    """What every decoding strategy shares.

    max_new_tokens: tokens to generate per row at most (>= 1).
    eos_token_id / pad_token_id: default to the model's generation config.
    do_sample: draw tokens from the full model's *processed* distribution (temperature, then
        top-k, then top-p) instead of the argmax (strategies that support it).
    temperature (> 0), top_k (None / 0: off), top_p ((0, 1], None: off): the processing.
    seed: reproducible draws (a ``generator`` given to ``generate`` wins). With
        ``draft_len="auto"`` (the default of several strategies) the draft lengths follow
        wall-clock measurements, and with them how many numbers each step draws: the sampled
        texts then differ between runs, while their distribution stays the target model's.
        Give a fixed ``draft_len`` for texts that repeat.
    stop_strings: stop a row at the token that completes one of these; the token may run
        past the string's end, as in HF's ``StopStringCriteria`` (needs the tokenizer).
    kernels: how the CPU computes few-row products (:mod:`exitwise.backbones.kernels`):
        "auto" (default, or ``$EXITWISE_KERNELS``), "stock", "streaming" or "packed".
    """

    max_new_tokens: int = 32
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_strings: str | list[str] | None = None
    kernels: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ConfigError(
                f"max_new_tokens must be a positive int; got {self.max_new_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"seed must be an int; got {self.seed!r}")

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


@dataclass
class DecodeInputs:
    """Validated inputs of one ``generate`` call. input_ids, mask: (B, T); eos: stop ids."""

    model: Any
    backbone: HFDecoderBackbone
    input_ids: torch.Tensor
    mask: torch.Tensor
    max_new_tokens: int
    eos: set[int]
    pad: int
    sampler: SamplingConfig
    stop: StopStrings | None
    callback: TokenCallback | None
    kernels: str = "auto"


def stats_for(inputs: DecodeInputs, name: str, cls: type = GenerationStats,
              **fields: Any) -> Any:
    """Fresh per-row statistics of a decode of ``inputs``."""
    b = inputs.input_ids.shape[0]
    return cls(strategy=name, num_layers=inputs.backbone.num_layers, drafted=[0] * b,
               accepted=[0] * b, **fields)


def session_for(inputs: DecodeInputs, stats: Any) -> StreamingSession:
    """The decode session (cache, per-row state, stopping, callback) of ``inputs``."""
    return StreamingSession(
        inputs.backbone, inputs.input_ids, inputs.mask.to(inputs.input_ids.device),
        inputs.max_new_tokens, inputs.eos, inputs.pad, stats, stop=inputs.stop,
        callback=inputs.callback,
    )


@dataclass
class DecodingStrategy:
    """Base of the registered strategies: the dataclass fields are the strategy's options."""

    registered_name: ClassVar[str] = ""
    samples: ClassVar[bool] = True  # whether do_sample=True is supported

    def validate(self, backbone: HFDecoderBackbone, model: Any) -> None:
        """Checks that need the model (e.g. an exit depth); raise ConfigError."""

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


def get_decoding_strategy(name: str, **options: Any) -> DecodingStrategy:
    """Strategy ``name`` with ``options``; an option of another strategy (or of none) is
    refused with the strategy it belongs to. Options given as None count as not given."""
    cls = DECODING_STRATEGIES.get(name)
    own = cls.option_names()
    foreign = sorted(k for k, v in options.items() if k not in own and v is not None)
    if foreign:
        owners = {k: [n for n, c in DECODING_STRATEGIES.items() if k in c.option_names()]
                  for k in foreign}
        said = "; ".join(
            f"{k} is an option of {', '.join(repr(o) for o in owners[k])}" if owners[k]
            else f"{k} is not an option of any strategy" for k in foreign)
        raise ConfigError(f"strategy {name!r} does not take {', '.join(foreign)} ({said}); "
                          f"its options: {', '.join(sorted(own)) or 'none'}")
    return cls(**{k: v for k, v in options.items() if k in own and v is not None})

"""``exitwise.generation.generate``: one entry point for every registered decoding strategy.

    out = generate(lm, input_ids, attention_mask, strategy="self_speculative",
                   exit_layer=6, draft_len=4, max_new_tokens=64)
    out = generate(lm, input_ids, attention_mask, GenerationConfig(max_new_tokens=64),
                   strategy=SelfSpeculative(exit_layer=6, draft_len=4))      # the same
    out.sequences          # (B, T + N), like model.generate(do_sample=False)
    out.stats.acceptance_rate

``model`` may be a Hugging Face causal LM, an :class:`~exitwise.backbones.HFDecoderBackbone`,
or a :class:`~exitwise.model.MultiExitModel` with ``lm`` exit heads (then a draft reads the
trained exit at ``exit_layer`` and its temperature).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..backbones import decoder_of
from ..backbones.kernels import few_row_kernels, resolve_kernels
from ..backbones.stack_probe import DecoderStackProbe
from ..backbones.special_tokens import eos_and_pad
from ..errors import ConfigError, InputError
from . import early_exit, greedy, self_speculative  # noqa: F401  (register the strategies)
from .outputs import GenerateOutput
from .sampling import SamplingConfig
from .stopping import StopStrings, TokenCallback
from .strategies import (
    DecodeInputs,
    DecodingStrategy,
    GenerationConfig,
    get_decoding_strategy,
)


def _split_options(
    config: GenerationConfig | None, strategy: str | DecodingStrategy, options: dict[str, Any]
) -> tuple[GenerationConfig, DecodingStrategy]:
    """Keyword options -> (the shared config, the strategy with its own options)."""
    shared = {k: v for k, v in options.items() if k in GenerationConfig.option_names()}
    rest = {k: v for k, v in options.items() if k not in shared}
    if config is None:
        config = GenerationConfig(**shared)
    elif shared:
        config = dataclasses.replace(config, **shared)
    if isinstance(strategy, DecodingStrategy):
        given = sorted(k for k, v in rest.items() if v is not None)
        if given:
            raise ConfigError(
                f"options {', '.join(given)} go to the strategy object itself "
                f"({type(strategy).__name__}(...)), not to generate")
        return config, strategy
    if not isinstance(strategy, str):
        raise ConfigError(f"strategy must be a name or a DecodingStrategy; got {strategy!r}")
    return config, get_decoding_strategy(strategy, **rest)


@torch.inference_mode()
def generate(
    model: nn.Module | Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    strategy: str | DecodingStrategy = "greedy",
    tokenizer: Any = None,
    callback: TokenCallback | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> GenerateOutput:
    """Decode a batch of prompts with ``strategy``.

    input_ids: (B, T) prompts, left-padded (right padding also works: it becomes holes).
    attention_mask: (B, T) 1 real / 0 padding; all ones if None.
    config: the options every strategy shares (:class:`GenerationConfig`: max_new_tokens,
        eos/pad ids, sampling, stop_strings, kernels); keyword ``options`` named like its
        fields override it.
    strategy: a registered name ("greedy", "self_speculative", "early_exit", ...) whose own
        options come as keywords (``exit_layer``, ``draft_len``, ``draft_threshold`` /
        ``policy``, ``kv``, ``exit_layers``), or a strategy object. An option the strategy
        does not have is refused, naming the strategy it belongs to.
    tokenizer: needed by ``stop_strings``; checked against the model's vocabulary.
    callback: ``callback(row, new_token_ids)`` each step with the tokens a row committed
        (self-speculative: accepted drafts + the full model's token, never rejected drafts).
    generator: the random source of sampling (wins over ``config.seed``).

    Few-row products run as ``config.kernels`` says (:mod:`exitwise.backbones.kernels`);
    they are rerouted for this call and this thread only: the model, its modules and their
    classes are never modified.
    """
    config, chosen = _split_options(config, strategy, options)
    kernels = resolve_kernels(config.kernels)
    if config.do_sample and not chosen.samples:
        raise ConfigError(f"strategy {chosen.registered_name!r} decodes greedily; do_sample is not "
                          "supported")
    # greedy decoding ignores the sampling options' values, as HF's generate does
    # (temperature=0 is a common way to ask for it); they are range-checked where they
    # shape draws
    if config.do_sample:
        sampler = SamplingConfig(True, config.temperature, config.top_k, config.top_p,
                                 generator)
    else:
        SamplingConfig.check_types(config.temperature, config.top_k, config.top_p)
        sampler = SamplingConfig(False, generator=generator)
    stop = None if config.stop_strings is None else StopStrings(config.stop_strings, tokenizer)
    backbone, _ = decoder_of(model, "generation")
    chosen.validate(backbone, model)
    if hasattr(tokenizer, "__len__") and len(tokenizer) > backbone.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{backbone.vocab_size}: tokenizer and model do not match")
    if not isinstance(input_ids, torch.Tensor):
        raise InputError("input_ids must be a (batch, seq_len) tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    mask = backbone.check_inputs(input_ids=input_ids, attention_mask=attention_mask)
    if backbone.max_positions is not None:
        # the last new token is emitted, never fed: prompt + max_new_tokens - 1 positions
        longest = int(mask.sum(1).max()) + config.max_new_tokens - 1
        if longest > backbone.max_positions:
            raise InputError(
                f"prompt ({int(mask.sum(1).max())} tokens) + max_new_tokens "
                f"({config.max_new_tokens}) - 1 exceeds the model's {backbone.max_positions} "
                "positions")
    eos, pad = eos_and_pad(backbone, config.eos_token_id, config.pad_token_id)
    if sampler.generator is None and config.seed is not None:
        sampler.generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    inputs = DecodeInputs(model=model, backbone=backbone, input_ids=input_ids, mask=mask,
                          max_new_tokens=config.max_new_tokens, eos=eos, pad=pad,
                          sampler=sampler, stop=stop, callback=callback, kernels=kernels)
    # "auto" keeps rerouting only at the row counts where a whole pass of this model measured
    # faster (once per machine and model; see exitwise.backbones.kernels), and only around
    # the passes of those row counts (per_call).
    probe = DecoderStackProbe(backbone) if kernels == "auto" else None
    with few_row_kernels(model, backbone.model, kernels=kernels, probe=probe,
                         per_call=True) as scope:
        out = chosen.decode(inputs)
    out.stats.kernels = kernels
    out.stats.streamed_products = scope.streamed
    return out

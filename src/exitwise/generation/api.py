"""``exitwise.generation.generate``: one entry point for every decoding strategy.

    out = generate(lm, input_ids, attention_mask, strategy="self_speculative",
                   exit_layer=6, draft_len=4, max_new_tokens=64)
    out.sequences          # (B, T + N), like model.generate(do_sample=False)
    out.stats.acceptance_rate

``model`` may be a Hugging Face causal LM, an :class:`~exitwise.backbones.HFDecoderBackbone`,
or a :class:`~exitwise.model.MultiExitModel` with ``lm`` exit heads (then the draft reads the
trained exit at ``exit_layer`` and its temperature).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..backbones import HFDecoderBackbone, wrap_backbone
from ..backbones.decoder_layouts import supported_decoder_types
from ..backbones.kernels import few_row_kernels, resolve_kernels
from ..backbones.special_tokens import eos_and_pad
from ..errors import ConfigError, InputError, UnsupportedModelError
from ..heads.lm import LMHead
from ..model import MultiExitModel
from .early_exit import generate_early_exit
from .greedy import greedy_decode
from .outputs import GenerateOutput, GenerationStats
from .sampling import SamplingConfig
from .self_speculative import self_speculative_decode
from .stopping import StopStrings, StreamingSession, TokenCallback

STRATEGIES = ("greedy", "self_speculative", "early_exit")


def _resolve(
    model: Any, exit_layer: int | None, need_head: bool
) -> tuple[HFDecoderBackbone, LMHead | None, float]:
    """(backbone adapter, draft head at exit_layer or None, its temperature)."""
    multi = isinstance(model, MultiExitModel)
    backbone = model.backbone if multi else wrap_backbone(model)
    if not isinstance(backbone, HFDecoderBackbone):
        raise UnsupportedModelError(
            f"generation needs a decoder-only LM (model_type in "
            f"{', '.join(supported_decoder_types())}); got a {type(backbone).__name__}"
        )
    if not need_head:
        return backbone, None, 1.0
    last = backbone.num_layers - 1
    if not _is_int(exit_layer) or not 1 <= exit_layer <= last:
        raise ConfigError(
            f"exit_layer must be a depth in 1..{last} (blocks run by the draft; this model has "
            f"{backbone.num_layers} layers); got {exit_layer!r}"
        )
    if not multi:
        shared = LMHead(backbone.hidden_size, backbone.vocab_size, backbone=backbone)
        return backbone, shared.eval(), 1.0
    if exit_layer not in model.exit_layers:
        raise ConfigError(
            f"this model has no exit at layer {exit_layer}; its exits: {model.exit_layers}"
        )
    k = model.exit_layers.index(exit_layer)
    head = model.heads[k]
    if not isinstance(head, LMHead):
        raise ConfigError(
            f"self-speculative drafting needs an 'lm' exit head; exit {exit_layer} has "
            f"{type(head).registered_name!r}"
        )
    return backbone, head, float(model.temperatures[k])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@torch.inference_mode()
def generate(
    model: nn.Module | Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    strategy: str = "greedy",
    exit_layer: int | None = None,
    draft_len: int = 4,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    draft_threshold: float | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    callback: TokenCallback | None = None,
    policy: Any = None,
    kv: str = "propagate",
    exit_layers: list[int] | None = None,
    kernels: str | None = None,
) -> GenerateOutput:
    """Greedy decoding (or sampling) of a batch of prompts.

    input_ids: (B, T) prompts, left-padded (right padding also works: it becomes holes).
    attention_mask: (B, T) 1 real / 0 padding; all ones if None.
    strategy: "greedy" (one token per full forward) or "self_speculative" (draft with the
        first ``exit_layer`` blocks, verify with the rest; same tokens as greedy).
    exit_layer: depth 1..L-1 of the draft exit (self-speculative only).
    draft_len: draft tokens per step (>= 1).
    max_new_tokens: tokens to generate per row at most (>= 1).
    eos_token_id / pad_token_id: default to the model's generation config.
    draft_threshold: optional; stop a draft early when its top-1 probability falls below.
    do_sample: draw tokens from the full model's *processed* distribution (temperature, then
        top-k, then top-p) instead of the argmax. Self-speculative decoding then uses
        speculative rejection sampling, so its tokens follow that same distribution exactly.
    temperature (> 0), top_k (None/0: off), top_p ((0, 1], None: off): the processing.
    seed / generator: reproducible draws (a generator wins over a seed; neither: global RNG).
    stop_strings: stop a row once its generated text ends with one of these (the completing
        token is kept); needs ``tokenizer``.
    callback: ``callback(row, new_token_ids)`` each step with the tokens a row committed
        (self-speculative: accepted drafts + the full model's token, never rejected drafts).
    policy / kv / exit_layers: strategy="early_exit" only (CALM-style; greedy): a token-level
        exit policy (e.g. ``get_policy("calm_softmax", threshold=0.9)``, or ``calm_learned``
        with a trained classifier), the KV mode of skipped layers and the exit depths
        (default: all). kv: "propagate" (CALM's copy; every layer still runs), "recompute"
        (exact K/V, every layer still runs) or "skip" (exited tokens' deeper layers are not
        run at their step but filled exactly, in parallel, by a later step: fewer sequential
        layers and block runs); see :mod:`exitwise.generation.early_exit`.
    kernels: how the CPU computes few-row products (one-token steps, verifying a draft, small
        batches) with the model's weights (:mod:`exitwise.backbones.kernels`). "auto" (the
        default, or ``$EXITWISE_KERNELS``): stock ``nn.Linear`` unless a measurement on this
        machine, for that weight shape and row count (made once at first use and cached),
        showed the streaming product faster; "stock": ``nn.Linear`` everywhere (Hugging Face's
        numerics bit for bit); "streaming": stream every few-row product. The streaming
        product equals the stock one up to round-off. The model itself is never modified.
    """
    kernels = resolve_kernels(kernels)
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if not _is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    speculative = strategy == "self_speculative"
    if speculative and (not _is_int(draft_len) or draft_len < 1):
        raise ConfigError(f"draft_len must be an int >= 1; got {draft_len!r}")
    if draft_threshold is not None and not 0.0 <= float(draft_threshold) <= 1.0:
        raise ConfigError(
            f"draft_threshold must be a probability in [0, 1]; got {draft_threshold!r}"
        )
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"seed must be an int; got {seed!r}")
    sampler = SamplingConfig(bool(do_sample), temperature, top_k, top_p, generator)
    stop = None if stop_strings is None else StopStrings(stop_strings, tokenizer)
    backbone, head, exit_temperature = _resolve(model, exit_layer, need_head=speculative)
    if hasattr(tokenizer, "__len__") and len(tokenizer) > backbone.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{backbone.vocab_size}: tokenizer and model do not match"
        )

    if not isinstance(input_ids, torch.Tensor):
        raise InputError("input_ids must be a (batch, seq_len) tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    mask = backbone.check_inputs(input_ids=input_ids, attention_mask=attention_mask)
    if backbone.max_positions is not None:
        longest = int(mask.sum(1).max()) + max_new_tokens
        if longest > backbone.max_positions:
            raise InputError(
                f"prompt ({int(mask.sum(1).max())} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's {backbone.max_positions} positions"
            )
    eos, pad = eos_and_pad(backbone, eos_token_id, pad_token_id)
    if sampler.generator is None and seed is not None:
        sampler.generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    with few_row_kernels(model, backbone.model, kernels=kernels) as scope:
        out = _decode(
            model, backbone, head, exit_temperature, strategy, input_ids, mask, max_new_tokens,
            eos, pad, exit_layer, draft_len, draft_threshold, sampler, stop, callback, policy, kv,
            exit_layers,
        )
    out.stats.kernels = kernels
    out.stats.streamed_products = scope.streamed
    return out


def _decode(
    model: Any, backbone: HFDecoderBackbone, head: LMHead | None, exit_temperature: float,
    strategy: str, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
    eos: set[int], pad: int, exit_layer: int | None, draft_len: int,
    draft_threshold: float | None, sampler: SamplingConfig, stop: StopStrings | None,
    callback: TokenCallback | None, policy: Any, kv: str, exit_layers: list[int] | None,
) -> GenerateOutput:
    """The chosen decoder on validated inputs (see :func:`generate`)."""
    speculative = strategy == "self_speculative"
    if strategy == "early_exit":  # exitwise.generation.early_exit

        return generate_early_exit(
            model, backbone, input_ids, mask, max_new_tokens, eos, pad, policy, kv, exit_layers,
            do_sample=sampler.do_sample, stop=stop, callback=callback,
        )
    b = input_ids.shape[0]
    stats = GenerationStats(
        strategy=strategy,
        num_layers=backbone.num_layers,
        exit_layer=exit_layer if speculative else None,
        draft_len=draft_len if speculative else None,
        drafted=[0] * b,
        accepted=[0] * b,
    )
    session = StreamingSession(
        backbone, input_ids, mask.to(input_ids.device), max_new_tokens, eos, pad, stats,
        stop=stop, callback=callback,
    )
    if speculative:
        assert head is not None and exit_layer is not None
        sequences = self_speculative_decode(
            session, head, exit_layer, draft_len, temperature=exit_temperature,
            draft_threshold=draft_threshold, sampler=sampler,
        )
    else:
        sequences = greedy_decode(session, sampler)
    return GenerateOutput(sequences=sequences, stats=stats)

"""The speculative decoding strategies, registered by name: ``self_speculative`` (exit drafts,
optionally feature-conditioned and/or with n-gram drafts), ``anpd`` (n-gram drafts alone) and
``layer_skip`` (Draft & Verify: the model minus some blocks drafts) and ``swift`` (the same
drafts, the skipped blocks chosen while decoding).
All run :func:`~.self_speculative.self_speculative_decode`; this module resolves their options:
the draft exit (given, a multi-exit model's shallowest ``lm`` exit, or the drafter shipped for
the model, :mod:`.shipped`) and the automatic draft-length controller, kept per model so that
what one call measured carries over to the next (:mod:`.draft_control`).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..backbones.hf_decoder import HFDecoderBackbone
from ..errors import ConfigError
from ..heads.lm import LMHead
from .draft_control import DraftLengthController
from .layer_skip import LayerSkipDrafter, check_skip, draft_threshold
from .ngram import NGramDrafter
from .outputs import GenerateOutput
from .self_speculative import self_speculative_decode
from .swift import SwiftDrafter, SwiftSearch
from .token_tree import check_tree_width, nominal_width
from .strategies import (
    DecodeInputs,
    DecodingStrategy,
    register_decoding_strategy,
    session_for,
    stats_for,
)


def draft_head(model: Any, backbone: HFDecoderBackbone, exit_layer: int) -> tuple[LMHead, float]:
    """(the draft head at ``exit_layer``, its calibration temperature): a MultiExitModel's
    trained ``lm`` exit there, or for a plain LM the shared final norm + LM head."""
    if model is backbone or not hasattr(model, "heads"):
        shared = LMHead(backbone.hidden_size, backbone.vocab_size, backbone=backbone)
        return shared.eval(), 1.0
    if exit_layer not in model.exit_layers:
        raise ConfigError(
            f"this model has no exit at layer {exit_layer}; its exits: {model.exit_layers}")
    k = model.exit_layers.index(exit_layer)
    head = model.heads[k]
    if not isinstance(head, LMHead):
        raise ConfigError(
            f"self-speculative drafting needs an 'lm' exit head; exit {exit_layer} has "
            f"{type(head).registered_name!r}")
    return head, float(model.temperatures[k])


def _head_key(model: Any, backbone: HFDecoderBackbone, head: LMHead) -> Any:
    """What identifies a draft head across ``generate`` calls: the shared LM head is built
    afresh per call (so its ``id`` would start a new controller, and a new calibration, at
    every call), a trained exit is the model's own module."""
    shared = model is backbone or not hasattr(model, "heads")  # as :func:`draft_head`
    return "shared" if shared else id(head)


def _check_draft_len(value: Any, name: str = "draft_len", auto: bool = True) -> None:
    """``value`` is an int >= 1 (or "auto" when ``auto``); else a ConfigError naming it."""
    if auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1{' or auto' if auto else ''}; "
                          f"got {value!r}")


DEFAULT_MAX_DRAFT_LEN = 8


def _check_max_len(max_draft_len: int | None, draft_len: Any) -> None:
    """``max_draft_len`` bounds automatic lengths only: given beside a fixed one it would do
    nothing, so it is refused rather than ignored."""
    if max_draft_len is None:
        return
    _check_draft_len(max_draft_len, "max_draft_len", auto=False)
    if isinstance(draft_len, int):
        raise ConfigError(f"max_draft_len bounds draft_len='auto'; draft_len={draft_len} is "
                          "fixed: leave max_draft_len out, or give draft_len='auto'")


def _max_len(strategy: Any) -> int:
    return strategy.max_draft_len or DEFAULT_MAX_DRAFT_LEN


def _decode_with_proposer(strategy: Any, inputs: DecodeInputs, proposer: Any,
                          key: tuple) -> GenerateOutput:
    """Decode with drafts that ``proposer`` knows before each step and no exit head
    (verification by every block): ``anpd`` and ``layer_skip``."""
    draft_len, max_len = strategy.draft_len, _max_len(strategy)
    fixed = draft_len if isinstance(draft_len, int) else max_len
    stats = stats_for(inputs, strategy.registered_name, exit_layer=0, draft_len=fixed)
    # a draft model's token trees: the controller's prior positions per draft (then measured)
    width = proposer.nominal_width if getattr(proposer, "tree", 1) != 1 else 1
    sequences = self_speculative_decode(
        session_for(inputs, stats), None, 0, fixed, sampler=inputs.sampler, proposer=proposer,
        proposal_len=fixed, controller=_controller(draft_len, max_len, inputs, key, width))
    return GenerateOutput(sequences=sequences, stats=stats)


# model (the HF module) -> {(what drafts, machine settings): controller}: what a controller
# measured (step costs per batch size, acceptance) carries over to the next generate call on
# the same model, so the calibration happens at first use, not at every call
_CONTROLLERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _controller(draft_len: int | str, max_draft_len: int, inputs: DecodeInputs,
                key: tuple, tree_width: float = 1) -> DraftLengthController | None:
    """The model's automatic draft-length controller for ``key`` (None unless "auto")."""
    if draft_len != "auto":
        return None
    per_model = _CONTROLLERS.setdefault(inputs.backbone.model, {})
    full = (*key, max_draft_len, tree_width, torch.get_num_threads(), inputs.kernels,
            str(inputs.input_ids.device))
    if full not in per_model:
        per_model[full] = DraftLengthController(max_len=max_draft_len, tree_width=tree_width)
    return per_model[full]


def _shallowest_lm_exit(model: Any) -> int | None:
    """Depth of a multi-exit model's shallowest ``lm`` exit (not the final layer), or None."""
    heads = getattr(model, "heads", None)
    if heads is None:
        return None
    for depth, head in zip(model.exit_layers[:-1], list(heads)[:-1]):
        if isinstance(head, LMHead):
            return int(depth)
    return None


@register_decoding_strategy("self_speculative")
@dataclass
class SelfSpeculative(DecodingStrategy):
    """Draft with the first ``exit_layer`` blocks and an exit head, verify with the rest:
    the tokens of greedy decoding (or, sampling, its distribution), fewer full passes.

    exit_layer: depth 1..L-1 of the draft exit. None: a multi-exit model's shallowest ``lm``
    exit, or for a plain LM the drafter shipped for exactly its weights
    (:mod:`exitwise.generation.shipped`; its measured options fill every option left None).
    draft_len: draft tokens per step (>= 1; default 4), or "auto": chosen per step from the
    measured costs and acceptance, 0 (plain decoding) when speculation does not pay, at most
    ``max_draft_len`` (default 8; refused beside a fixed length; :mod:`.draft_control`).
    draft_threshold: stop a row's draft once its top-1 probability is below this. ngram:
    also draft from the text's own n-grams up to this order (ANPD, :mod:`.ngram`; None or 0:
    off; ``ngram_len`` needs it): a row whose tables predict a
    continuation drafts it instead of the exit's tokens, up to ``ngram_len`` tokens (default:
    ``draft_len``). tree_width: > 1 also verifies, at every draft, the exit's next
    ``tree_width - 1`` choices as sibling leaves of a token tree in the same pass
    (:mod:`.token_tree`; greedy or sampled, both lossless); "confidence": SWIFT's widths per
    depth from the exit's top-1 probability there (:func:`.token_tree.confidence_widths`).
    """

    exit_layer: int | None = None
    draft_len: int | str | None = None
    draft_threshold: float | None = None
    ngram: int | None = None
    ngram_len: int | None = None
    max_draft_len: int | None = None
    tree_width: int | str = 1

    def __post_init__(self) -> None:
        check_tree_width(self.tree_width)
        if self.draft_len is not None:
            _check_draft_len(self.draft_len)
        _check_max_len(self.max_draft_len, self.draft_len)
        if self.ngram_len is not None:
            _check_draft_len(self.ngram_len, "ngram_len", auto=False)
        if self.ngram:
            NGramDrafter(self.ngram)  # validates the order
        if self.draft_threshold is not None:
            value = self.draft_threshold
            if isinstance(value, str) or not isinstance(value, (int, float)) or isinstance(
                    value, bool) or not 0.0 <= float(value) <= 1.0:
                extra = (" ('auto', Draft & Verify's adaptive threshold, is an option of the "
                         "layer_skip and swift strategies)" if value == "auto" else "")
                raise ConfigError(f"draft_threshold must be a probability in [0, 1]; "
                                  f"got {value!r}{extra}")

    def validate(self, backbone: HFDecoderBackbone, model: Any) -> None:
        last = backbone.num_layers - 1
        e, drafter_model, shipped = self.exit_layer, model, {}
        if e is None:
            e = _shallowest_lm_exit(model)
        if e is None and not hasattr(model, "heads"):
            from .shipped import find_drafter, with_shipped_drafter

            found = find_drafter(backbone)
            if found is not None:
                e, shipped = found.exit_layer, found.options
                drafter_model = with_shipped_drafter(backbone, found)
        if e is None:
            raise ConfigError(
                "exit_layer is required: this model has no tuned 'lm' exit and no drafter is "
                "shipped for its weights (tune one with `exitwise tune-lm` or "
                "ew.tune_exits, or pass exit_layer to draft through the shared LM head)")
        if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= last:
            raise ConfigError(
                f"exit_layer must be a depth in 1..{last} (blocks run by the draft; this model "
                f"has {backbone.num_layers} layers); got {e!r}")
        if self.ngram_len is not None and not (
                self.ngram if self.ngram is not None else shipped.get("ngram")):
            raise ConfigError("ngram_len is the length of n-gram drafts: give ngram (their "
                              "largest order) too")
        if self.draft_len is None:  # the shipped drafter's length, or the default 4
            _check_max_len(self.max_draft_len, shipped.get("draft_len", 4))
        # what decode() runs: the options given, else the shipped drafter's, else defaults
        self._resolved = (drafter_model, e, shipped)

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        model, exit_layer, shipped = getattr(
            self, "_resolved", (inputs.model, self.exit_layer, {}))
        draft_len = self.draft_len if self.draft_len is not None else shipped.get(
            "draft_len", 4)
        ngram = self.ngram if self.ngram is not None else shipped.get("ngram")
        head, temperature = draft_head(model, inputs.backbone, exit_layer)
        fixed = draft_len if isinstance(draft_len, int) else _max_len(self)
        stats = stats_for(inputs, self.registered_name, exit_layer=exit_layer, draft_len=fixed)
        sequences = self_speculative_decode(
            session_for(inputs, stats), head, exit_layer, fixed,
            temperature=temperature, draft_threshold=self.draft_threshold,
            sampler=inputs.sampler, proposer=NGramDrafter(ngram) if ngram else None,
            proposal_len=self.ngram_len, tree_width=self.tree_width,
            controller=_controller(draft_len, _max_len(self), inputs,
                                   ("self_speculative", _head_key(model, inputs.backbone, head),
                                    exit_layer, ngram or 0, self.tree_width),
                                   nominal_width(self.tree_width, inputs.sampler.do_sample)))
        return GenerateOutput(sequences=sequences, stats=stats)


@register_decoding_strategy("anpd")
@dataclass
class ANPD(DecodingStrategy):
    """Adaptive n-gram parallel decoding (Ou et al., 2024): drafts read from the text's own
    multi-level n-gram tables, verified by every block; no exit, no training (:mod:`.ngram`).

    ngram: the largest order N (tables of orders N .. 2). draft_len: tokens per draft (>= 1),
    or "auto" (chosen per step from measured costs and acceptance, at most
    ``max_draft_len``).
    """

    ngram: int = 4
    draft_len: int | str = "auto"
    max_draft_len: int | None = None

    def __post_init__(self) -> None:
        _check_draft_len(self.draft_len)
        _check_max_len(self.max_draft_len, self.draft_len)
        NGramDrafter(self.ngram)

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        return _decode_with_proposer(self, inputs, NGramDrafter(self.ngram), ("anpd", self.ngram))


@register_decoding_strategy("layer_skip")
@dataclass
class LayerSkip(DecodingStrategy):
    """Draft & Verify: draft with the model itself minus sub-layers ``skip`` (e.g. the
    ``skip`` of :func:`~.layer_skip.search_skip_layers`), verify with every block; no head, no
    training (:mod:`.layer_skip`).

    skip (required): blocks in 1..L-2 (both sub-layers of each), (block, "attn" | "mlp")
    pairs, or {"attn": blocks, "mlp": blocks}. draft_len: tokens per draft (>= 1), or "auto"
    (chosen per step from measured costs and acceptance, at most ``max_draft_len``).
    draft_threshold: None, a probability (a row's draft also stops after a token the draft
    model is less sure of), or "auto" (that threshold adapted as Draft & Verify's reference,
    from 0.8; :class:`~.layer_skip.DraftThreshold`); the reference's own setting is
    ``draft_len=8, draft_threshold="auto"``. tree_width: 1 (chains), W > 1 (each draft's
    next W - 1 choices of the draft model verified as sibling leaves of a token tree), or
    "confidence" (SWIFT's trees: per depth, more candidates the less sure the draft is;
    :func:`~.token_tree.confidence_widths`).
    """

    skip: Any = None
    draft_len: int | str = "auto"
    max_draft_len: int | None = None
    draft_threshold: float | str | None = None
    tree_width: int | str = 1

    def __post_init__(self) -> None:
        _check_draft_len(self.draft_len)
        _check_max_len(self.max_draft_len, self.draft_len)
        draft_threshold(self.draft_threshold)
        check_tree_width(self.tree_width)

    def validate(self, backbone: HFDecoderBackbone, model: Any) -> None:
        if self.skip is None:
            raise ConfigError("layer_skip needs skip=[blocks or sub-layers to leave out of the "
                              "draft] (`exitwise generate --skip`; choose them with "
                              "exitwise.generation.search_skip_layers)")
        check_skip(self.skip, backbone.num_layers)

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        assert self.skip is not None
        drafter = LayerSkipDrafter(self.skip, inputs.backbone.num_layers,
                                   draft_threshold(self.draft_threshold), self.tree_width,
                                   inputs.sampler.do_sample)
        return _decode_with_proposer(self, inputs, drafter, ("layer_skip", tuple(drafter.skip),
                                                             self.draft_threshold,
                                                             self.tree_width))


# model (the HF module) -> {search options: SwiftSearch}: SWIFT's search goes on across
# generate calls, as the reference's statistics go on across the prompts of a task
_SWIFT_SEARCHES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_SWIFT_OPTIONS = ("skip_ratio", "context_window", "opt_interval", "bayes_interval",
                  "max_opt_iter", "max_tolerance_iter", "max_score", "bayes", "sublayers",
                  "seed")
# the search's defaults (the reference's), one place for the strategy and swift_search
_SWIFT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SwiftSearch)
                   if f.name in _SWIFT_OPTIONS}


def swift_search(model: Any, **options: Any) -> SwiftSearch:
    """The :class:`~.swift.SwiftSearch` that ``strategy="swift"`` with these ``options`` uses
    for ``model`` (made on first use; it persists while the model lives). Read its ``skip``,
    ``best_score`` and ``observed`` to see what the search found."""
    from ..backbones import decoder_of

    unknown = sorted(set(options) - set(_SWIFT_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown SWIFT option(s) {unknown}; choose from {_SWIFT_OPTIONS}")
    backbone, _ = decoder_of(model, "swift_search")
    per_model = _SWIFT_SEARCHES.setdefault(backbone.model, {})
    key = tuple(sorted({**_SWIFT_DEFAULTS, **options}.items()))
    if key not in per_model:
        per_model[key] = SwiftSearch(backbone.num_layers, **options)
    return per_model[key]


@register_decoding_strategy("swift")
@dataclass
class Swift(DecodingStrategy):
    """SWIFT: draft with the model itself minus sub-layers chosen on the fly while decoding
    (:mod:`.swift`), verify with every block; no head, no training, no offline search.

    skip_ratio: share of the 2 (L - 2) sub-layers of the middle blocks (or, with
    ``sublayers=False``, of the L - 2 middle blocks) a candidate set skips (0.45).
    context_window: generated tokens a candidate is scored on (32; the search starts once a
    row has generated more). opt_interval: a search iteration every this many decoding
    steps (1). bayes_interval: every this many iterations the candidate comes from Bayesian
    optimisation instead of a random draw (25; ``bayes=False``: random only). sublayers:
    candidates are attention and MLP sub-layers apart (True, as the reference) or whole
    blocks. max_opt_iter, max_tolerance_iter, max_score: stop the search after this many
    iterations (1000), this many in a row without improvement (300), or once a matchness
    exceeds this (0.95).
    search_seed: the search's random draws (``seed`` is the sampling seed every strategy
    shares). The search persists per model and options across calls
    (:func:`swift_search`). draft_len: tokens per draft (>= 1) or "auto" (chosen per step from
    measured costs and acceptance, at most ``max_draft_len``). draft_threshold, tree_width:
    as ``layer_skip``'s (a row's draft also stops after an unsure token, "auto" adapts it;
    token trees of the draft's next choices, "confidence" for SWIFT's dynamic verification).
    """

    skip_ratio: float = _SWIFT_DEFAULTS["skip_ratio"]
    context_window: int = _SWIFT_DEFAULTS["context_window"]
    opt_interval: int = _SWIFT_DEFAULTS["opt_interval"]
    bayes_interval: int = _SWIFT_DEFAULTS["bayes_interval"]
    max_opt_iter: int = _SWIFT_DEFAULTS["max_opt_iter"]
    max_tolerance_iter: int = _SWIFT_DEFAULTS["max_tolerance_iter"]
    max_score: float = _SWIFT_DEFAULTS["max_score"]
    bayes: bool = _SWIFT_DEFAULTS["bayes"]
    sublayers: bool = _SWIFT_DEFAULTS["sublayers"]
    search_seed: int = _SWIFT_DEFAULTS["seed"]
    draft_len: int | str = "auto"
    max_draft_len: int | None = None
    draft_threshold: float | str | None = None
    tree_width: int | str = 1

    def __post_init__(self) -> None:
        _check_draft_len(self.draft_len)
        _check_max_len(self.max_draft_len, self.draft_len)
        draft_threshold(self.draft_threshold)
        check_tree_width(self.tree_width)
        SwiftSearch(3, **self._search_options())  # validates the options

    def _search_options(self) -> dict[str, Any]:
        options = {name: getattr(self, name) for name in _SWIFT_OPTIONS if name != "seed"}
        return {**options, "seed": self.search_seed}

    def validate(self, backbone: HFDecoderBackbone, model: Any) -> None:
        SwiftSearch(backbone.num_layers, **self._search_options())  # too few blocks: refused

    def decode(self, inputs: DecodeInputs) -> GenerateOutput:
        search = swift_search(inputs.backbone, **self._search_options())
        drafter = SwiftDrafter(search, draft_threshold(self.draft_threshold), self.tree_width,
                               inputs.sampler.do_sample)
        return _decode_with_proposer(self, inputs, drafter,
                                     ("swift", id(search), self.draft_threshold,
                                      self.tree_width))

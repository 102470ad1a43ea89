"""Adapter for Hugging Face encoders (BERT family), driven by :mod:`encoder_layouts`.

The adapter does not copy any model's ``forward``: it calls the model's own embedding module
and its own layer modules one at a time, and builds the attention mask with transformers' own
``create_bidirectional_mask`` so that eager, SDPA and other attention back-ends all get the
mask format they expect.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InputError, UnsupportedModelError
from .base import Backbone, BackboneState, OwnClassifier, hf_label_names, resolve_path
from .encoder_layouts import ENCODER_LAYOUTS, EncoderLayout, supported_encoder_types


# What a batch may hold (Hugging Face's names); anything else is refused, not ignored.
ENCODER_INPUTS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds"})


def base_model_of(model: nn.Module) -> nn.Module:
    """The bare encoder inside a task model (``BertForSequenceClassification.bert``)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


class HFEncoderBackbone(Backbone):
    """A Hugging Face encoder as a stack of blocks.

    ``start`` takes the usual tokenizer outputs: input_ids (B, T), attention_mask (B, T),
    optional token_type_ids / position_ids / inputs_embeds (B, T, E).
    """

    family = "hf-encoder"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        base = base_model_of(model)
        # The task model around the encoder (``BertForSequenceClassification`` ...), kept out
        # of the module tree (its encoder is ``self.model``; its classifier is the native
        # final exit's): in a list so that nn.Module does not register it twice.
        self._task = [model] if model is not base else []
        config = getattr(base, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in ENCODER_LAYOUTS:
            raise UnsupportedModelError(
                f"encoder model_type {model_type!r} is not supported; supported: "
                f"{', '.join(supported_encoder_types())}. Add a row to "
                "exitwise.backbones.encoder_layouts.ENCODER_LAYOUTS for a BERT-like model."
            )
        self.model = base
        self.config = config
        self.model_type: str = model_type
        self.layout: EncoderLayout = ENCODER_LAYOUTS[model_type]
        self.embeddings = resolve_path(base, self.layout.embeddings)
        self.blocks = resolve_path(base, self.layout.layers)
        self.project = resolve_path(base, self.layout.project)
        if self.embeddings is None or self.blocks is None:
            raise UnsupportedModelError(
                f"{type(base).__name__} does not have the layout expected for {model_type!r}"
            )
        self.hidden_size = int(getattr(config, "hidden_size", None) or getattr(config, "dim"))
        self.num_layers = int(
            getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers")
        )
        self.intermediate_size = int(
            getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim")
        )
        if self.layout.convention == "deberta":
            self.deberta_encoder = resolve_path(base, "encoder")
        if self.layout.shared_groups:
            self.num_groups = int(config.num_hidden_groups)

    # -- pieces other modules may want -------------------------------------------------------
    def pooler_module(self) -> nn.Module | None:
        """The backbone's own pooler dense layer, if it has one (used to seed pooler heads)."""
        pooler = resolve_path(self.model, self.layout.pooler)
        if isinstance(pooler, nn.Module) and hasattr(pooler, "dense"):
            return pooler.dense
        return pooler if isinstance(pooler, nn.Linear) else None

    def own_classifier(self) -> OwnClassifier | None:
        """The sequence classifier of the task model given (``*ForSequenceClassification``),
        as the native final exit applies it; None for a bare encoder."""
        task = self._task[0] if self._task else None
        if task is None or not type(task).__name__.endswith("ForSequenceClassification"):
            return None
        kind = self.layout.task_head
        names = {
            "pooled": ("classifier", "dropout"), "albert": ("classifier", "dropout"),
            "sequence": ("classifier",), "distilbert": ("pre_classifier", "classifier",
                                                        "dropout"),
            "deberta": ("pooler", "classifier", "dropout"),
        }[kind]
        modules = {n: getattr(task, n, None) for n in names}
        if kind == "pooled":
            modules["pooler"] = getattr(self.model, "pooler", None)
        if kind == "albert":
            modules["pooler"] = getattr(self.model, "pooler", None)
            modules["pooler_activation"] = getattr(self.model, "pooler_activation", None)
        if any(not isinstance(m, nn.Module) for m in modules.values()):
            return None  # an unusual task model: no native exit, a fresh head instead
        n = int(task.config.num_labels)
        return OwnClassifier(kind, modules, n, hf_label_names(task.config, n))

    @property
    def task_model(self) -> nn.Module | None:
        """The ``*ForSequenceClassification`` model given, if any (its encoder is ``model``)."""
        return self._task[0] if self._task else None

    def block(self, i: int) -> nn.Module:
        if self.layout.shared_groups:
            return self.blocks[int(i / (self.num_layers / self.num_groups))]
        return self.blocks[i]

    def feature_dim(self, layer: int) -> int:
        return self.hidden_size

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "name_or_path": getattr(self.config, "_name_or_path", "") or "",
            "architecture": type(self.model).__name__,
            "task_architecture": type(self._task[0]).__name__ if self._task else None,
        }

    def reference(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's own forward: last_hidden_state (B, T, H) and the mask."""
        self.check_inputs(**inputs)
        names = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
        if self.model_type == "distilbert":
            names = ("input_ids", "attention_mask", "inputs_embeds")
        out = self.model(**{k: inputs[k] for k in names if inputs.get(k) is not None})
        mask = inputs.get("attention_mask")
        return out.last_hidden_state, mask

    def check_inputs(self, **inputs: Any) -> torch.Tensor:
        """Validate a tokenized batch; return its attention mask (B, T) (all ones if absent).

        Shared by ``start`` and ``reference`` so that both paths reject the same bad input
        with an InputError instead of an index error deep inside the embeddings.
        """
        extra = sorted(set(inputs) - ENCODER_INPUTS)
        if extra:  # a misspelt attention_mask would otherwise run every row unmasked
            raise InputError(f"unexpected inputs {extra} for a text encoder: it takes "
                             f"{', '.join(sorted(ENCODER_INPUTS))}")
        input_ids = inputs.get("input_ids")
        embeds = inputs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            raise InputError("give input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref.dim() < 2:
            raise InputError(f"input_ids must be (batch, seq_len); got shape {tuple(ref.shape)}")
        self.check_batch(ref.shape[0])
        if ref.shape[1] == 0:
            raise InputError("the sequences are empty (seq_len 0)")
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if mask.shape != ref.shape[:2]:
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but inputs are {tuple(ref.shape[:2])}"
            )
        if bool((mask.sum(1) == 0).any()):
            raise InputError("a row of attention_mask is all zeros (a row with no tokens)")
        if input_ids is not None and int(input_ids.max()) >= self.config.vocab_size:
            raise InputError(
                f"input_ids contain id {int(input_ids.max())} but the vocabulary has "
                f"{self.config.vocab_size} entries: tokenizer and model do not match"
            )
        if input_ids is not None and int(input_ids.min()) < 0:
            raise InputError(
                f"input_ids contain the negative id {int(input_ids.min())}; label-style -100 "
                "padding belongs in labels, pad input_ids with the tokenizer's pad id"
            )
        types = inputs.get("token_type_ids")
        n_types = int(getattr(self.config, "type_vocab_size", 0) or 0)
        if types is not None and "token_type_ids" in self.layout.embed_inputs:
            if types.shape != ref.shape[:2]:
                raise InputError(
                    f"token_type_ids has shape {tuple(types.shape)} but inputs are "
                    f"{tuple(ref.shape[:2])}"
                )
            if n_types and (int(types.max()) >= n_types or int(types.min()) < 0):
                raise InputError(
                    f"token_type_ids must be in [0, {n_types}) for this model; got values "
                    f"{int(types.min())}..{int(types.max())}"
                )
        return mask

    def example_input(self, batch_size: int = 1, length: int = 128) -> dict[str, torch.Tensor]:
        """A blank batch of ``length`` tokens (at most half the model's positions: RoBERTa's
        start after its padding id): what placing exits by FLOPs (``layers="flops:..."``)
        runs; the blocks of an encoder all cost the same, so the placement hardly depends
        on the length."""
        positions = int(getattr(self.config, "max_position_embeddings", 0) or 2 * length)
        n = max(1, min(length, positions // 2))
        device = next(self.parameters()).device
        return {"input_ids": torch.zeros(batch_size, n, dtype=torch.long, device=device),
                "attention_mask": torch.ones(batch_size, n, dtype=torch.long, device=device)}

    # -- the contract -----------------------------------------------------------------------
    def start(self, **inputs: Any) -> BackboneState:
        mask = self.check_inputs(**inputs)
        kwargs = {}
        for name in self.layout.embed_inputs:
            if name == "mask":
                kwargs["mask"] = mask
            elif inputs.get(name) is not None:
                kwargs[name] = inputs[name]
        hidden = self.embeddings(**kwargs)
        if self.project is not None:
            hidden = self.project(hidden)
        state = BackboneState(hidden=hidden, mask=mask)
        if self.layout.convention == "deberta" and self.deberta_encoder.conv is not None:
            state.rows["embeddings"] = hidden
        return self.refresh(state)

    def refresh(self, state: BackboneState) -> BackboneState:
        if self.layout.convention == "deberta":
            enc = self.deberta_encoder
            state.shared["layer_mask"] = enc.get_attention_mask(state.mask)
            state.shared["relative_pos"] = enc.get_rel_pos(state.hidden)
            state.shared["rel_embeddings"] = enc.get_rel_embedding()
        else:
            from transformers.masking_utils import create_bidirectional_mask

            state.shared["layer_mask"] = create_bidirectional_mask(
                config=self.config, inputs_embeds=state.hidden, attention_mask=state.mask
            )
        return state

    def step(self, i: int, state: BackboneState) -> BackboneState:
        block = self.block(i)
        if self.layout.convention == "deberta":
            out = block(
                state.hidden,
                state.shared["layer_mask"],
                relative_pos=state.shared["relative_pos"],
                rel_embeddings=state.shared["rel_embeddings"],
            )[0]
            if i == 0 and self.deberta_encoder.conv is not None:
                # DeBERTa-v2 mixes a convolution of the embeddings into the first layer's output.
                out = self.deberta_encoder.conv(state.rows["embeddings"], out, state.mask)
        else:
            out = block(state.hidden, state.shared["layer_mask"])
            if isinstance(out, tuple):
                out = out[0]
        if self.layout.convention == "deberta" and i == 0:
            state.rows.pop("embeddings", None)
        state.hidden = out
        return state

    def keep(self, state: BackboneState, rows: torch.Tensor) -> BackboneState:
        new = BackboneState(
            hidden=state.hidden.index_select(0, rows),
            mask=state.mask.index_select(0, rows),
            rows={k: v.index_select(0, rows) for k, v in state.rows.items()},
        )
        # Drop trailing padding columns nobody in the smaller batch needs: with right padding
        # these keys are masked out for every remaining row, so results do not change.
        length = int(new.mask.sum(1).max())
        if length < new.mask.shape[1] and not bool(new.mask[:, length:].any()):
            new.hidden = new.hidden[:, :length]
            new.mask = new.mask[:, :length]
            new.rows = {k: v[:, :length] if v.dim() > 1 else v for k, v in new.rows.items()}
        return self.refresh(new)

    # -- cost model -------------------------------------------------------------------------
    def layer_flops(self, i: int, state: BackboneState) -> torch.Tensor:
        """Multiply-adds x2 per row for one block on the row's real tokens.

        Per token: Q, K, V, O projections (4 H^2) and the feed-forward (2 H I); per token pair:
        scores and weighted sum (2 H). DeBERTa's disentangled attention adds the content-to-
        position and position-to-content score terms (2 more H per pair).
        """
        n = state.mask.sum(1).to(torch.float64)
        h, inter = float(self.hidden_size), float(self.intermediate_size)
        pair_terms = 4.0 if self.layout.convention == "deberta" else 2.0
        return 2.0 * (n * (4 * h * h + 2 * h * inter) + pair_terms * n * n * h)


def truncate_encoder(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep only the first ``num_layers`` blocks of an HF encoder (in place), for static
    truncation baselines. The config is updated so ``save_pretrained`` round-trips."""
    base = base_model_of(model)
    model_type = getattr(base.config, "model_type", None)
    layout = ENCODER_LAYOUTS.get(model_type)
    if layout is None:
        raise UnsupportedModelError(f"cannot truncate a {model_type!r} encoder")
    parent_path, _, attr = layout.layers.rpartition(".")
    parent = resolve_path(base, parent_path) if parent_path else base
    blocks = getattr(parent, attr)
    if layout.shared_groups:
        _truncate_shared(base.config, parent, attr, num_layers)
        return model
    if not 1 <= num_layers <= len(blocks):
        raise ConfigError(f"can keep 1..{len(blocks)} layers, not {num_layers}")
    setattr(parent, attr, nn.ModuleList(list(blocks)[:num_layers]))
    key = "n_layers" if hasattr(base.config, "n_layers") else "num_hidden_layers"
    setattr(base.config, key, num_layers)
    return model


def _truncate_shared(config: Any, parent: nn.Module, attr: str, num_layers: int) -> None:
    """ALBERT: layer i runs group int(i / (L / G)) (HF's AlbertTransformer and
    :meth:`HFEncoderBackbone.block`), so the first k layers cut from it must map to the same
    groups under int(i / (k / G')) with the first G' groups kept: always so with one group
    or at a multiple of L / G; not, e.g., for 4 of 6 layers in 2 groups (groups 0, 0, 0, 1)."""
    total, groups = int(config.num_hidden_layers), int(config.num_hidden_groups)
    if not 1 <= num_layers <= total:
        raise ConfigError(f"can keep 1..{total} layers, not {num_layers}")
    used = [int(i / (total / groups)) for i in range(num_layers)]
    fits = [g for g in range(1, groups + 1)
            if [int(i / (num_layers / g)) for i in range(num_layers)] == used]
    if not fits:
        raise ConfigError(
            f"this ALBERT shares {groups} layer groups over {total} layers: its first "
            f"{num_layers} run groups {used}, which no cut model reproduces (a layer runs "
            f"group int(i / (layers / groups))); keep another number of layers (a multiple "
            f"of {total / groups:g} always works)")
    setattr(parent, attr, nn.ModuleList(list(getattr(parent, attr))[: fits[0]]))
    config.num_hidden_groups = fits[0]
    config.num_hidden_layers = num_layers

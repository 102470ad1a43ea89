"""Where each Hugging Face encoder keeps its parts, keyed by ``config.model_type``.

This table is the only per-architecture knowledge the encoder adapter has. A new BERT-like
model is one new row: attribute paths, the keyword names its embedding module takes, and
which of the few layer calling conventions it uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderLayout:
    """Attribute paths (dotted, relative to the base model) and calling conventions.

    embeddings:   the embedding module.
    embed_inputs: names of the inputs the embedding module accepts as keywords.
    project:      optional linear layer mapping embedding_size -> hidden_size (ALBERT, ELECTRA).
    layers:       ModuleList of blocks (for ALBERT: the layer *groups*, shared across depth).
    convention:   "hf" (layer(hidden, mask4d)), "deberta" (relative positions + conv after layer 0).
    shared_groups: ALBERT-style weight sharing: block i uses group int(i / (L / G)).
    pooler:       optional pooler (dense) whose weights can seed "pooler" exit heads.
    pooler_act:   optional activation module applied after ``pooler`` (ALBERT keeps it apart).
    task_head:    how the family's ``*ForSequenceClassification`` applies its classifier after
                  the encoder (a ``kind`` of :mod:`exitwise.heads.native`).
    """

    embeddings: str
    embed_inputs: tuple[str, ...]
    layers: str
    project: str | None = None
    convention: str = "hf"
    shared_groups: bool = False
    pooler: str | None = None
    pooler_act: str | None = None
    task_head: str = "pooled"


_BERT_INPUTS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")
_BERT = EncoderLayout("embeddings", _BERT_INPUTS, "encoder.layer", pooler="pooler")
_ROBERTA = EncoderLayout("embeddings", _BERT_INPUTS, "encoder.layer", pooler="pooler",
                         task_head="sequence")

ENCODER_LAYOUTS: dict[str, EncoderLayout] = {
    "bert": _BERT,  # also sentence-transformers MiniLM checkpoints
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "electra": EncoderLayout(
        "embeddings", _BERT_INPUTS, "encoder.layer", project="embeddings_project",
        task_head="sequence",
    ),
    "albert": EncoderLayout(
        "embeddings",
        _BERT_INPUTS,
        "encoder.albert_layer_groups",
        project="encoder.embedding_hidden_mapping_in",
        shared_groups=True,
        pooler="pooler",
        pooler_act="pooler_activation",
        task_head="albert",
    ),
    "distilbert": EncoderLayout(
        "embeddings", ("input_ids", "inputs_embeds", "position_ids"), "transformer.layer",
        task_head="distilbert",
    ),
    "deberta-v2": EncoderLayout(
        "embeddings",
        ("input_ids", "token_type_ids", "position_ids", "inputs_embeds", "mask"),
        "encoder.layer",
        convention="deberta",
        task_head="deberta",
    ),
}


def supported_encoder_types() -> list[str]:
    return sorted(ENCODER_LAYOUTS)

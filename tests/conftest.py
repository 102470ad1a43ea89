"""Shared fixtures: tiny random encoders of every supported family, built in memory."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# What exitwise keeps between runs (kernel timings, converted models) goes to a folder of this
# test run, never to the user's ~/.cache; and a user's kernel override must not steer tests.
os.environ["EXITWISE_CACHE"] = tempfile.mkdtemp(prefix="exitwise-tests-")
os.environ.pop("EXITWISE_KERNELS", None)
# One intra-op thread for the whole suite: on tiny in-memory models, a second thread only adds
# synchronisation cost (several-fold slower on a busy 2-core machine), and CI runs tests in one
# process anyway. Benchmarks set their own thread count.
torch.set_num_threads(1)

VOCAB = 99


def tiny_encoder(family: str, seed: int = 0):
    """A 4-layer, 32-wide random encoder of ``family`` in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    bert_like = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
    )
    if family == "bert":
        model = tf.BertModel(tf.BertConfig(**bert_like))
    elif family == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(**{**bert_like, "pad_token_id": 1}))
    elif family == "xlm-roberta":
        model = tf.XLMRobertaModel(tf.XLMRobertaConfig(**{**bert_like, "pad_token_id": 1}))
    elif family == "camembert":
        model = tf.CamembertModel(tf.CamembertConfig(**{**bert_like, "pad_token_id": 1}))
    elif family == "electra":
        model = tf.ElectraModel(tf.ElectraConfig(embedding_size=16, **bert_like))
    elif family == "albert":
        model = tf.AlbertModel(
            tf.AlbertConfig(embedding_size=16, num_hidden_groups=2, inner_group_num=1, **bert_like)
        )
    elif family == "distilbert":
        model = tf.DistilBertModel(
            tf.DistilBertConfig(
                dim=32, n_layers=4, n_heads=4, hidden_dim=64, dropout=0.0,
                attention_dropout=0.0, **common,
            )
        )
    elif family == "deberta-v2":
        model = tf.DebertaV2Model(
            tf.DebertaV2Config(
                relative_attention=True, position_buckets=8, max_relative_positions=16,
                pos_att_type=["p2c", "c2p"], conv_kernel_size=3, norm_rel_ebd="layer_norm",
                type_vocab_size=2, **bert_like,
            )
        )
    else:  # pragma: no cover
        raise ValueError(family)
    return model.eval()


ENCODER_FAMILIES = [
    "bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "distilbert",
    "deberta-v2",
]


def padded_batch(lengths=(7, 4, 9, 5), seed: int = 1, pad_id: int = 0):
    """Right-padded random token batch: input_ids and attention_mask of shape (B, max(lengths))."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.full((len(lengths), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=ENCODER_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A 4-layer random Llama (vocab 64) + a word-level tokenizer with a chat template, saved
    to a folder (see helpers/chat_lm.py)."""
    from helpers.chat_lm import save_tiny_chat_llama

    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-llama"))

"""SWEET (``training/sweet.py``): after one backward pass every backbone layer holds the gradient
of the next exit's loss alone (computed here separately with ``torch.autograd.grad`` on that one
loss), the embeddings the first exit's; also with the model's own classifier as the final exit
and for regression; a regression model trains; shared or cascading weights are refused."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import VOCAB, tiny_encoder
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.training import PaddingCollator, exit_task_loss, get_strategy, train


def _batch(n: int = 8, regression: bool = False):
    batch = PaddingCollator()(token_items(n, seed=3))
    labels = batch.pop("labels")
    return batch, (labels.float() * 2.0 - 0.5 if regression else labels)


def _segment_of(model: ew.MultiExitModel) -> dict[str, int]:
    """Parameter name -> index of the exit whose loss alone must reach it (the next exit at or
    above it); parameters no exit reads are absent."""
    owner: dict[int, int] = {}
    for p in model.backbone.embeddings.parameters():
        owner[id(p)] = 0
    for i, block in enumerate(model.backbone.blocks):
        k = next(k for k, d in enumerate(model.exit_layers) if i < d)
        for p in block.parameters():
            owner[id(p)] = k
    for k, head in enumerate(model.heads):
        for p in head.parameters():
            owner[id(p)] = k
    return {n: owner[id(p)] for n, p in model.named_parameters() if id(p) in owner}


def _check_sweet_rule(model: ew.MultiExitModel, regression: bool = False) -> None:
    model.eval()  # same forward twice (no dropout); gradients flow in eval mode too
    batch, labels = _batch(regression=regression)
    named = dict(model.named_parameters())
    segment = _segment_of(model)
    names = list(segment)
    # each exit's loss alone, from a plain forward (no gradient scaling)
    out = model(**batch)
    alone = [
        dict(zip(names, torch.autograd.grad(exit_task_loss(out, labels, k),
                                            [named[n] for n in names],
                                            retain_graph=True, allow_unused=True)))
        for k in range(model.num_exits)
    ]
    # SWEET: one backward pass of the summed loss
    (stage,) = get_strategy("sweet").stages(model)
    model.zero_grad(set_to_none=True)
    stage.loss(model(**batch, **stage.forward_kwargs), labels).backward()
    for name in names:
        want = alone[segment[name]][name]
        got = named[name].grad
        assert want is not None and got is not None, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    # parameters no exit reads (the encoder's pooler next to fresh pooler heads) stay untouched
    for name, p in named.items():
        if name not in segment:
            assert p.grad is None or not p.grad.any(), name
    # the rule matters: joint training would give the embeddings every exit's gradient
    emb = next(n for n in names if "word_embeddings" in n)
    joint = sum(g[emb] for g in alone)
    assert (joint - named[emb].grad).abs().max() > 1e-4


def test_each_layer_gets_only_the_next_exits_gradient():
    """Exits at depths 1, 3, 4: embeddings + block 1 <- L0, blocks 2-3 <- L1, block 4 <- L2;
    the loss is the plain sum of the exits' cross-entropies."""
    model = tiny_model(layers=[1, 3, 4])
    batch, labels = _batch()
    (stage,) = get_strategy("sweet").stages(model)
    with torch.no_grad():
        out = model.eval()(**batch)
        want = sum(float(exit_task_loss(out, labels, k)) for k in range(3))
        assert float(stage.loss(out, labels)) == pytest.approx(want, rel=1e-6)
    assert stage.forward_kwargs["grad_scales"] == [(1.0, 0.0)] * 3
    _check_sweet_rule(model)


def _task_model(num_labels: int) -> tf.BertForSequenceClassification:
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, hidden_size=32,
        num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
    )
    return tf.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("num_labels", [3, 1])
def test_native_final_exit_and_regression_follow_the_rule(num_labels):
    """The model's own pooler + classifier is the final exit: it and blocks 3-4 get the final
    loss only; blocks 1-2 and the embeddings the first exit's (MSE for num_labels=1)."""
    model = ew.attach_exits(_task_model(num_labels), ew.ExitConfig(layers=[2, 4], dropout=0.0))
    assert type(model.heads[-1]).registered_name == "native"
    assert model.task == ("regression" if num_labels == 1 else "classification")
    _check_sweet_rule(model, regression=num_labels == 1)
    # the model's own pooler is the native head's: it got the final exit's gradient
    assert model.backbone.model.pooler.dense.weight.grad.abs().sum() > 0


def test_regression_model_trains(tmp_path):
    items = [dict(i, labels=float(i["labels"])) for i in token_items(64, seed=0)]
    model = tiny_model(layers=[2, 4], num_labels=1)
    batch = PaddingCollator()(items)
    labels = batch.pop("labels")

    def mse() -> list[float]:
        with torch.no_grad():
            out = model.eval()(**batch)
        return [float(exit_task_loss(out, labels, k)) for k in range(model.num_exits)]

    before = mse()
    train(model, items, strategy="sweet", output_dir=tmp_path, max_steps=24, save_final=False,
          **FAST)
    after = mse()
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    assert model.backbone_tuned


def test_shared_weights_across_an_exit_are_refused():
    """ALBERT with 2 groups over 4 layers: an exit after layer 1 splits group 1 (layers 1-2)."""
    albert = tiny_encoder("albert")
    model = ew.attach_exits(albert, ew.ExitConfig(layers="all", num_labels=2, dropout=0.0))
    with pytest.raises(ew.ConfigError, match="shares its weights"):
        get_strategy("sweet").stages(model)
    # exits where a group ends separate the groups: allowed
    ok = ew.attach_exits(albert, ew.ExitConfig(layers=[2, 4], num_labels=2, dropout=0.0))
    assert len(get_strategy("sweet").stages(ok)) == 1


def test_cascading_heads_with_gradient_are_refused(tmp_path):
    model = tiny_model(head="cascade", head_kwargs={"detach_previous": False})
    with pytest.raises(ew.ConfigError, match="detach_previous"):
        train(model, token_items(8), strategy="sweet", output_dir=tmp_path, max_steps=1, **FAST)
    detached = tiny_model(head="cascade", head_kwargs={"detach_previous": True})
    assert len(get_strategy("sweet").stages(detached)) == 1

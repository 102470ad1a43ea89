"""ElasticBERT's multi-exit fine-tuning (``training/elasticbert.py``): the summed exit losses
with gradient equilibrium. After one backward pass each exit's head holds its own loss's
gradient and the layers below exit k the *mean* of the gradients of exits k..K-1, each computed
here separately with ``torch.autograd.grad`` on that one loss; classification and regression."""

from __future__ import annotations

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.training import PaddingCollator, exit_task_loss, get_strategy, train


def _first_exit_above(model: ew.MultiExitModel, block: int) -> int:
    """Index of the first exit reading the output of 0-based ``block`` or a later block."""
    return next(k for k, d in enumerate(model.exit_layers) if block < d)


@pytest.mark.parametrize("layers,num_labels", [("all", 2), ([1, 3, 4], 1)])
def test_trunk_gets_the_mean_of_the_exits_above_heads_their_own(layers, num_labels):
    model = tiny_model(layers=layers, num_labels=num_labels).eval()
    batch = PaddingCollator()(token_items(8, seed=5))
    labels = batch.pop("labels")
    if num_labels == 1:
        labels = labels.float() * 3.0 - 1.0
    n_exits = model.num_exits
    named = dict(model.named_parameters())
    # expected gradient of every parameter, from each exit's loss alone (plain forward)
    out = model(**batch)
    params = list(named.values())
    alone = [
        torch.autograd.grad(exit_task_loss(out, labels, k), params, retain_graph=True,
                            allow_unused=True)
        for k in range(n_exits)
    ]
    grads = {name: [g[i] for g in alone] for i, name in enumerate(named)}

    def mean_from(k: int, name: str) -> torch.Tensor:
        terms = grads[name][k:]
        return sum(terms) / len(terms)

    name_of = {id(p): n for n, p in named.items()}
    want: dict[str, torch.Tensor] = {}
    for p in model.backbone.embeddings.parameters():
        want[name_of[id(p)]] = mean_from(0, name_of[id(p)])
    for i, block in enumerate(model.backbone.blocks):
        k = _first_exit_above(model, i)
        for p in block.parameters():
            want[name_of[id(p)]] = mean_from(k, name_of[id(p)])
    for k, head in enumerate(model.heads):
        for p in head.parameters():
            want[name_of[id(p)]] = grads[name_of[id(p)]][k]

    (stage,) = get_strategy("elasticbert").stages(model)
    model.zero_grad(set_to_none=True)
    loss = stage.loss(model(**batch, **stage.forward_kwargs), labels)
    # the loss is the plain sum of the exits' losses (forward values are not rescaled)
    total = sum(float(exit_task_loss(out, labels, k).detach()) for k in range(n_exits))
    assert float(loss.detach()) == pytest.approx(total, rel=1e-6)
    loss.backward()
    for key, expected in want.items():
        torch.testing.assert_close(named[key].grad, expected, rtol=1e-5, atol=1e-7, msg=key)
    # the mean, not the sum: the embeddings' gradient is 1/K of what joint training sends
    emb = name_of[id(model.backbone.embeddings.word_embeddings.weight)]
    summed = sum(grads[emb])
    torch.testing.assert_close(named[emb].grad * n_exits, summed, rtol=1e-4, atol=1e-6)
    assert (summed - named[emb].grad).abs().max() > 1e-4


def test_elasticbert_trains_every_exit(tmp_path):
    items = token_items(64, seed=0)
    model = tiny_model()
    batch = PaddingCollator()(items)
    labels = batch.pop("labels")

    def losses() -> list[float]:
        with torch.no_grad():
            out = model.eval()(**batch)
        return [float(exit_task_loss(out, labels, k)) for k in range(model.num_exits)]

    before = losses()
    train(model, items, strategy="elasticbert", output_dir=tmp_path, max_steps=24,
          save_final=False, **FAST)
    after = losses()
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_bad_options_are_clear_errors():
    with pytest.raises(ew.ConfigError, match="elasticbert"):
        get_strategy("elasticbert", weights="depth")
    with pytest.raises(ew.ConfigError, match="1 stage"):
        get_strategy("elasticbert", stage_args=[{}, {}]).stages(tiny_model())

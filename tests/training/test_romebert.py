"""RomeBERT (``training/romebert.py``): the self-distillation losses and the gradient
regularization (one-sided projection) against values computed by hand, the training step's
gradient against an independent computation, and the recipe end to end on a tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.trainkit import FAST, tiny_model, token_items

import exitwise as ew
from exitwise.outputs import ExitOutputs
from exitwise.training import PaddingCollator, get_strategy, train
from exitwise.training.romebert import project_conflict, romebert_losses


def softmax(v):
    z = sum(math.exp(x) for x in v)
    return [math.exp(x) / z for x in v]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def ce(v, y):
    return -math.log(softmax(v)[y])


def test_losses_by_hand():
    s1 = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    s2 = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    teacher = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([1, 2])
    gamma, t = 0.9, 3.0
    final_want = (ce([0.0, 2.0, 1.0], 1) + ce([1.0, 0.0, 0.0], 2)) / 2
    exits_ce = exits_kl = 0.0
    for s in (s1, s2):
        exits_ce += sum(ce(r.tolist(), int(c)) for r, c in zip(s, y)) / 2
        exits_kl += sum(kl(softmax([x / t for x in tr.tolist()]),
                           softmax([x / t for x in sr.tolist()]))
                        for sr, tr in zip(s, teacher)) / 2
    out = ExitOutputs(logits=[s1, s2, teacher])
    final, exits = romebert_losses(out, y, gamma, t)  # the reference's 'mean': / (B x C)
    assert float(final) == pytest.approx(final_want, rel=1e-6)
    assert float(exits) == pytest.approx((1 - gamma) * exits_ce + gamma * t * t * exits_kl / 3,
                                         rel=1e-6)
    _, batchmean = romebert_losses(out, y, gamma, t, kl_reduction="batchmean")
    assert float(batchmean) == pytest.approx((1 - gamma) * exits_ce + gamma * t * t * exits_kl,
                                             rel=1e-6)
    # the teacher only gives targets to the exits
    teacher.requires_grad_(True)
    s1.requires_grad_(True)
    _, exits = romebert_losses(ExitOutputs(logits=[s1, s2, teacher]), y, gamma, t)
    exits.backward()
    assert teacher.grad is None and s1.grad is not None


def test_projection_removes_the_conflicting_component_over_the_shared_tensors():
    a, b = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    # <b, a> = -1 < 0, |a|^2 = 1: b - (-1) a = [0, 1]; the update a + b' = [1, 1]
    out, conflicted = project_conflict(a, b, [True])
    assert conflicted and out[0].tolist() == [1.0, 1.0]
    # no conflict: the plain sum
    out, conflicted = project_conflict(a, [torch.tensor([1.0, 1.0])], [True])
    assert not conflicted and out[0].tolist() == [2.0, 1.0]
    # a tensor outside the shared set is summed as is, even when the two conflict there
    out, _ = project_conflict(a, b, [False])
    assert out[0].tolist() == [0.0, 1.0]
    # shared tensors are flattened together: tensor 0 conflicts (-2), tensor 1 agrees (+1),
    # jointly <b, a> = -1, |a|^2 = 2: b' = b + a / 2 on both tensors
    a2 = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([3.0]), None]
    b2 = [torch.tensor([-2.0]), torch.tensor([1.0]), torch.tensor([-7.0]), torch.tensor([5.0])]
    out, conflicted = project_conflict(a2, b2, [True, True, False, False])
    assert conflicted
    assert [float(g) for g in out] == [-0.5, 2.5, -4.0, 5.0]  # unshared and one-sided: as is


@pytest.mark.parametrize("projection", ["final", "exits"])
def test_step_hands_the_projected_gradient_to_the_trainer(projection):
    model = tiny_model().train()
    (stage,) = get_strategy("romebert", projection=projection).stages(model)
    batch = PaddingCollator()(token_items(16, seed=0))  # a batch on which the two conflict
    labels = batch.pop("labels")
    loss, _ = stage.step(model, batch, labels)
    params = dict(model.named_parameters())
    # independently: both losses' gradients, and the projection of one of them (the final
    # loss's, or the exits') over the weight matrices both reach (embedding tables excepted)
    out = model(**batch)
    final, exits = romebert_losses(out, labels)
    torch.testing.assert_close(loss.detach(), (final + exits).detach())
    gf = torch.autograd.grad(final, list(params.values()), retain_graph=True, allow_unused=True)
    ge = torch.autograd.grad(exits, list(params.values()), allow_unused=True)
    names = list(params)
    shared = [p.dim() >= 2 and "embeddings" not in n and gf[i] is not None and ge[i] is not None
              for i, (n, p) in enumerate(params.items())]
    shared_names = {n for n, s in zip(names, shared) if s}
    assert "backbone.model.encoder.layer.0.attention.self.query.weight" in shared_names
    assert not any("layer.3." in n or "LayerNorm" in n or n.startswith("heads.")
                   for n in shared_names)  # the last block only the final exit reaches
    keep, give = (ge, gf) if projection == "final" else (gf, ge)
    a = torch.cat([keep[i].flatten() for i, s in enumerate(shared) if s])
    b = torch.cat([give[i].flatten() for i, s in enumerate(shared) if s])
    coef = float(a @ b) / float(a @ a)
    assert coef < 0  # they conflict here, so the projection is exercised
    model.zero_grad()
    loss.backward()
    for i, name in enumerate(names):
        if gf[i] is None and ge[i] is None:
            continue
        want = (0 if ge[i] is None else ge[i]) + (0 if gf[i] is None else gf[i])
        if shared[i]:
            want = want - coef * keep[i]
        torch.testing.assert_close(params[name].grad, want, atol=1e-6, rtol=1e-4, msg=name)
    assert stage.step.steps == 1 and stage.step.conflicts == 1


def test_romebert_end_to_end(tmp_path):
    items = token_items(96, seed=0)
    model = tiny_model()
    recipe = get_strategy("romebert")
    train(model, items, strategy=recipe, output_dir=tmp_path, max_steps=30,
          save_final=False, **FAST)
    assert recipe.last_step is not None and recipe.last_step.steps == 30
    model.eval()
    batch = PaddingCollator()(items[:32])
    labels = batch.pop("labels")
    with torch.no_grad():
        out = model(**batch)
    accs = [float((z.argmax(-1) == labels).float().mean()) for z in out.logits]
    assert accs[-1] > 0.75 and max(accs[:-1]) > 0.75, accs
    # "SD only": no custom step, the plain sum is backpropagated
    (stage,) = get_strategy("romebert", projection=None).stages(model)
    assert stage.step is None
    with torch.no_grad():
        final, exits = romebert_losses(out, labels)
    torch.testing.assert_close(stage.loss(out, labels), final + exits)


def test_misuse_raises_config_errors(tmp_path):
    for bad, match in [({"gamma": 1.5}, "gamma must be in"), ({"temperature": 0}, "temperature"),
                       ({"projection": "both"}, "projection"),
                       ({"kl_reduction": "sum"}, "kl_reduction")]:
        with pytest.raises(ew.ConfigError, match=match):
            get_strategy("romebert", **bad)
    with pytest.raises(ew.ConfigError, match="early exit"):
        get_strategy("romebert").stages(tiny_model(layers=[4]))
    items = token_items(8)
    with pytest.raises(ew.ConfigError, match="classification"):
        train(tiny_model(num_labels=1), [dict(i, labels=0.5) for i in items],
              strategy="romebert", output_dir=tmp_path, max_steps=1, **FAST)

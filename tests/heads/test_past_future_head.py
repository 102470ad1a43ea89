"""The ``past_future`` head (Global Past-Future early exit) and the past-states mechanism.

A head that declares ``uses_past_states`` receives the pooled states of the earlier exits
(``past``) in ``forward``, in the real early-exit executor (rows that leave the batch take
their states with them) and in the logits cache; its combination of past, own and imitated
future states is checked against a value computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import padded_batch, tiny_encoder

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.errors import ConfigError, InputError
from exitwise.heads.past_future import PastFutureHead

LENGTHS = (7, 4, 9, 5, 3, 8, 6, 2, 9, 1)


def pf_model(layers="all", seed: int = 0, spread: float = 0.2, **kwargs) -> ew.MultiExitModel:
    """A tiny 4-layer BERT with past_future heads whose weights are large enough that the
    past and imitated states move the logits (the reference's 0.02 init barely does)."""
    model = ew.attach_exits(tiny_encoder("bert", seed=seed), ew.ExitConfig(
        layers=layers, head="past_future", num_labels=3, dropout=0.0, **kwargs))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * spread)
    return model.eval()


def features_per_exit(model, batch):
    """(hidden, mask) that each exit's head reads, from one plain pass over the backbone."""
    state = model.backbone.start(**batch)
    feats = []
    for i in range(model.backbone.num_layers):
        state = model.backbone.step(i, state)
        if i + 1 in model.exit_lookup:
            feats.append(model.backbone.features(state))
    return feats


def test_the_model_sizes_each_head_by_its_place():
    model = pf_model()
    assert [(h.exit_index, h.num_exits, len(h.imitators)) for h in model.heads] == [
        (0, 4, 3), (1, 4, 2), (2, 4, 1), (3, 4, 0)]
    assert all(h.weight.shape == (4, 32, 6) for h in model.heads)
    two = pf_model(layers=[2, 4])
    assert [(h.exit_index, h.num_exits, len(h.imitators)) for h in two.heads] == [
        (0, 2, 1), (1, 2, 0)]
    alone = ew.build_head("past_future", 8, 2)  # standalone: one exit, no past, no future
    assert (alone.exit_index, alone.num_exits, len(alone.imitators)) == (0, 1, 0)


def _matvec(w, x):  # y_o = sum_i x_i w[i][o]  (w: D x O, as the head's per-position maps)
    return [sum(x[i] * w[i][o] for i in range(len(x))) for o in range(len(w[0]))]


def test_past_own_and_imitated_future_combine_as_computed_by_hand():
    """Exit 1 of 3, D = C = 2: P = a_0 + a_1 (past + own), F = a_2 (imitated), lambda =
    sigmoid(G tanh((g_0 + g_1) / 2) + g), logits = 2 lambda P + (2 - 2 lambda) F."""
    head = PastFutureHead(2, 2, dropout=0.0, exit_index=1, num_exits=3, pooling="first").eval()
    dense_w, dense_b = [[1.0, 0.5], [-0.5, 1.0]], [0.1, 0.0]  # out x in, as nn.Linear
    imit_w, imit_b = [[0.3, -1.0], [0.8, 0.2]], [0.0, -0.1]
    maps = [[[0.2, -0.1, 0.4, 0.3], [0.5, 0.2, -0.3, 0.1]],
            [[-0.4, 0.6, 0.1, -0.2], [0.3, 0.3, 0.2, 0.5]],
            [[0.7, -0.5, 0.9, 0.9], [-0.2, 0.4, -0.6, 0.8]]]  # W_j: D x 2C
    biases = [[0.1, 0.0, 0.0, 0.2], [0.0, -0.1, 0.1, 0.0], [0.05, 0.05, -0.3, 0.0]]
    gate_w, gate_b = [[1.5, -0.5], [0.25, 2.0]], [0.1, -0.2]
    with torch.no_grad():
        head.dense.weight.copy_(torch.tensor(dense_w))
        head.dense.bias.copy_(torch.tensor(dense_b))
        head.imitators[0].weight.copy_(torch.tensor(imit_w))
        head.imitators[0].bias.copy_(torch.tensor(imit_b))
        head.weight.copy_(torch.tensor(maps))
        head.bias.copy_(torch.tensor(biases))
        head.gate.weight.copy_(torch.tensor(gate_w))
        head.gate.bias.copy_(torch.tensor(gate_b))
    cls, s0 = [0.3, 0.8], [0.5, -0.2]
    hidden = torch.tensor([[cls, [9.0, 9.0]]])  # (1, T=2, D): only [CLS] is read
    s1 = [math.tanh(sum(w * x for w, x in zip(row, cls)) + b) for row, b in zip(dense_w, dense_b)]
    s2 = [math.tanh(sum(w * x for w, x in zip(row, s1)) + b) for row, b in zip(imit_w, imit_b)]
    proj = [[v + b for v, b in zip(_matvec(maps[j], s), biases[j])]
            for j, s in enumerate([s0, s1, s2])]
    past = [proj[0][c] + proj[1][c] for c in range(2)]
    future = [proj[2][c] for c in range(2)]
    g = [math.tanh((proj[0][2 + c] + proj[1][2 + c]) / 2) for c in range(2)]
    lam = [1 / (1 + math.exp(-(sum(w * x for w, x in zip(row, g)) + b)))
           for row, b in zip(gate_w, gate_b)]
    want = [2 * lam[c] * past[c] + (2 - 2 * lam[c]) * future[c] for c in range(2)]
    got = head(hidden, torch.ones(1, 2, dtype=torch.long), past=[torch.tensor([s0])])
    torch.testing.assert_close(got, torch.tensor([want]))
    torch.testing.assert_close(head.exit_state(hidden), torch.tensor([s1]))
    torch.testing.assert_close(head.imitate(torch.tensor([s1])), torch.tensor([[s2]]))


def test_the_default_pools_the_mean_of_the_real_tokens():
    """s_k = tanh(A mean(real tokens) + a); padding is not read, and an input whose [CLS] is
    the same for every row still gets a state that follows its other tokens."""
    head = PastFutureHead(2, 2, dropout=0.0).eval()
    dense_w, dense_b = [[1.0, 0.5], [-0.5, 1.0]], [0.1, 0.0]
    with torch.no_grad():
        head.dense.weight.copy_(torch.tensor(dense_w))
        head.dense.bias.copy_(torch.tensor(dense_b))
    cls = [0.3, 0.8]
    hidden = torch.tensor([[cls, [1.0, -1.0], [7.0, 7.0]],   # row 0: the third token is padding
                           [cls, [0.2, 0.6], [-0.4, 0.1]]])  # row 1: three real tokens
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    means = [[(0.3 + 1.0) / 2, (0.8 - 1.0) / 2], [(0.3 + 0.2 - 0.4) / 3, (0.8 + 0.6 + 0.1) / 3]]
    want = [[math.tanh(sum(w * x for w, x in zip(row, m)) + b) for row, b in zip(dense_w, dense_b)]
            for m in means]
    torch.testing.assert_close(head.exit_state(hidden, mask), torch.tensor(want))
    first = PastFutureHead(2, 2, dropout=0.0, pooling="first").eval()
    first.load_state_dict(head.state_dict())
    same = first.exit_state(hidden, mask)
    assert torch.equal(same[0], same[1])  # the reference's [CLS] pooling cannot tell them apart
    d = 2.0
    assert (head.head_flops(mask, 2) - first.head_flops(mask, 2)).tolist() == [2 * d, 3 * d]


def test_the_last_exit_has_no_future_term():
    head = PastFutureHead(4, 3, dropout=0.0, exit_index=1, num_exits=2).eval()
    x, s0 = torch.randn(2, 4), torch.randn(2, 4)
    own = head.exit_state(x)
    proj = torch.einsum("bed,edo->beo", torch.stack([s0, own], 1), head.weight) + head.bias
    lam = torch.sigmoid(head.gate(torch.tanh(proj[:, :, 3:].mean(1))))
    torch.testing.assert_close(head(x, past=[s0]), 2 * lam * proj[:, :, :3].sum(1))


def test_forward_hands_each_exit_the_states_of_the_earlier_exits():
    model = pf_model()
    batch = padded_batch(lengths=(7, 4, 9, 5))
    with torch.no_grad():
        out = model(**batch, return_features=True)
        feats = features_per_exit(model, batch)
        states = [model.heads[k].exit_state(*feats[k]) for k in range(4)]
        for k, (hidden, mask) in enumerate(feats):
            torch.testing.assert_close(out.logits[k], model.heads[k](hidden, mask, past=states[:k]))
            torch.testing.assert_close(out.features[k], states[k])  # the feature is s_k
            if k:  # the past really matters
                moved = [s + torch.randn_like(s) for s in states[:k]]
                assert not torch.allclose(model.heads[k](hidden, mask, past=moved), out.logits[k])


@pytest.mark.parametrize("detach", [True, False])
def test_past_states_are_detached_as_in_the_reference(detach):
    model = pf_model(head_kwargs={"detach_past": detach}).train()
    out = model(**padded_batch())
    out.logits[2].sum().backward()
    grad = model.heads[0].dense.weight.grad  # s_0 reaches exit 2 only as a past state
    assert (grad is None or not grad.any()) if detach else grad.abs().sum() > 0


def _mixed_entropy_policy(cache):
    """An entropy threshold at which rows leave at several exits (some at the first, some
    later), far from every row's entropy (so float round-off between batch shapes cannot
    flip a decision)."""
    logp = cache.logits.log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)[:, :-1]  # (N, E - 1): the exits that decide
    values = ent.flatten().sort().values
    best, best_score = None, None
    for t in ((values[1:] + values[:-1]) / 2).tolist():
        idx = replay(ew.get_policy("entropy", threshold=t), cache).exit_index
        score = (len(set(idx.tolist())), float((ent - t).abs().min()))
        if 0 < int((idx == 0).sum()) < cache.num_examples and (
                best_score is None or score > best_score):
            best, best_score = t, score
    assert best is not None and best_score[1] > 1e-4
    return ew.get_policy("entropy", threshold=best)


def test_runtime_equals_replay_and_never_exit_equals_forward():
    model = pf_model()
    batch = padded_batch(lengths=LENGTHS)
    cache = collect_exit_logits(model, [dict(batch, labels=torch.arange(10) % 3)],
                                progress=False)
    with torch.no_grad():
        expected = torch.stack(model(**batch).logits, 1)
    torch.testing.assert_close(cache.logits, expected)
    policy = _mixed_entropy_policy(cache)
    live = model.early_exit(policy, **batch)
    offline = replay(policy, cache, model.temperatures)
    assert torch.equal(live.exit_index, offline.exit_index)
    assert torch.equal(live.predictions, offline.predictions)
    assert torch.equal(live.flops, offline.costs)
    rows = torch.arange(cache.num_examples)  # the executor returns the cached logits
    torch.testing.assert_close(live.logits, cache.logits[rows, live.exit_index],
                               atol=1e-5, rtol=1e-5)
    never = model.early_exit(ew.get_policy("never"), **batch)
    torch.testing.assert_close(never.logits, expected[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.full_depth(**batch), expected[:, -1])


def test_rows_leaving_mid_batch_keep_the_remaining_rows_past_states():
    model = pf_model()
    batch = padded_batch(lengths=LENGTHS)
    cache = collect_exit_logits(model, [batch], progress=False)
    policy = _mixed_entropy_policy(cache)
    batched = model.early_exit(policy, **batch)
    # rows leave at several exits, and some run on past an exit where others left
    assert len(set(batched.exit_index.tolist())) >= 3
    assert batched.rows_per_layer[0] > batched.rows_per_layer[-1] > 0
    for r, n in enumerate(LENGTHS):
        alone = model.early_exit(policy, input_ids=batch["input_ids"][r : r + 1, :n],
                                 attention_mask=batch["attention_mask"][r : r + 1, :n])
        assert int(alone.exit_index[0]) == int(batched.exit_index[r])
        torch.testing.assert_close(alone.logits[0], batched.logits[r], atol=1e-5, rtol=1e-5)


def test_saved_heads_load_back_bit_identical(tmp_path):
    model = pf_model(layers=[1, 3, 4])
    model.save_pretrained(tmp_path)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=model.backbone.model)
    assert [(h.exit_index, h.num_exits) for h in loaded.heads] == [(0, 3), (1, 3), (2, 3)]
    for (n, a), (_, b) in zip(model.heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert torch.equal(a, b), n
    batch = padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).stacked(), model(**batch).stacked())


def test_head_flops_count_pooler_imitators_projections_and_gate():
    model = pf_model()
    d, c = 32, 3
    per_position = 2 * d * 2 * c
    for k, head in enumerate(model.heads):
        linear = 2 * d * d * (1 + (3 - k)) + 2 * c * c  # pooler + imitators, gate
        want = linear + 4 * per_position + 8 * c
        assert head.head_flops(None, 2).tolist() == [float(want)] * 2


def test_misuse_is_refused_clearly():
    with pytest.raises(ConfigError, match="exit_index"):
        ew.build_head("past_future", 8, 2, exit_index=2, num_exits=2)
    with pytest.raises(ConfigError, match="num_exits"):
        ew.build_head("past_future", 8, 2, num_exits=1.5)
    with pytest.raises(ConfigError, match="pooling must be one of"):
        ew.build_head("past_future", 8, 2, pooling="max")
    later = ew.build_head("past_future", 8, 2, exit_index=1, num_exits=3)
    with pytest.raises(InputError, match="reads the states of the 1 exits before it"):
        later(torch.randn(2, 8))  # no past: it is not the first exit
    with pytest.raises(InputError, match="shape"):
        later(torch.randn(2, 8), past=[torch.randn(2, 5)])
    # an earlier exit that is not a past_future head leaves no state to read
    mixed = ew.attach_exits(tiny_encoder("bert"), ew.ExitConfig(
        layers="all", head=["pooler", "past_future", "past_future", "past_future"],
        num_labels=2))
    with pytest.raises(InputError, match="every earlier exit must be a past_future head"):
        mixed(**padded_batch())

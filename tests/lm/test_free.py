"""FREE's shallow-deep training (``exitwise.lm.objectives.free``): the loss terms against hand
computations, and the recipe on a tiny random Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.lmkit import VOCAB, tiny_lm  # noqa: E402

import exitwise as ew  # noqa: E402
from exitwise.lm import FreeConfig, loop  # noqa: E402
from exitwise.lm.data import batch_at_step, split_holdout, tokenize_texts  # noqa: E402
from exitwise.lm.objectives.free import (  # noqa: E402
    dyna_alignment,
    free_losses,
    layer_kd_loss,
    shallow_deep_forward,
    shallow_deep_weights,
    teacher_layers,
)


def tune_free(model, texts, tokenizer=None, *, output_dir=None, progress=False, **options):
    return ew.tune_exits(model, texts, FreeConfig(**options), tokenizer=tokenizer,
                         output_dir=output_dir, progress=progress)


def lr_at(step, steps, lr, warmup):
    return lr * loop.lr_scale("linear", step, steps, warmup)


def test_ce_weights_are_the_depths():
    assert shallow_deep_weights(6, 24) == pytest.approx((6 / 30, 24 / 30))
    assert shallow_deep_weights(1, 4) == pytest.approx((0.2, 0.8))


def test_teacher_map_reproduces_the_reference_table():
    # reference TEACHER_LAYERS (0-based indices into the per-block states) + 1 = depths
    table = {(24, 12): [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23],
             (24, 8): [2, 5, 8, 11, 14, 17, 20, 23], (24, 6): [3, 7, 11, 15, 19, 23],
             (24, 4): [5, 11, 17, 23], (12, 3): [3, 7, 11]}
    for (L, s), idx in table.items():
        assert teacher_layers(L, s) == [i + 1 for i in idx]


def test_dyna_alignment_by_hand():
    mse = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.05, 0.3], [0.4, 0.01, 0.2]])
    # last teacher: smallest is student 1; then only students < 1 -> 0; then none < 0 -> 0
    assert dyna_alignment(mse) == [0, 0, 1]


def _states(values: list[float], garbage: float = 100.0) -> list[torch.Tensor]:
    """Per depth a (1, 3, 2) state equal to ``v`` on the two real tokens, garbage on a pad."""
    out = []
    for v in values:
        t = torch.full((1, 3, 2), float(v))
        t[0, 2] = garbage
        out.append(t.requires_grad_(True))
    return out


def test_layer_kd_terms_by_hand():
    mask = torch.tensor([[1, 1, 0]])
    # L = 4, L_s = 2: students N(h_1) = 2, N(h_2) = 0; teachers depths 2, 4 -> 0, 2.5
    # M = [[(0-2)^2, (0-0)^2], [(2.5-2)^2, (2.5-0)^2]] = [[4, 0], [0.25, 6.25]]
    states = _states([2.0, 0.0, 3.0, 2.5])
    assert float(layer_kd_loss(states, 2, mask, "unif").detach()) == pytest.approx(
        (4 + 6.25) / 2)
    assert float(layer_kd_loss(states, 2, mask, "last").detach()) == pytest.approx(6.25)
    # dyna: teacher 2 -> student 0 (0.25); teacher 1 -> no student < 0 left -> 0 (4)
    dyna = layer_kd_loss(states, 2, mask, "dyna")
    assert float(dyna.detach()) == pytest.approx((4 + 0.25) / 2)
    assert float(layer_kd_loss(states, 2, mask, None)) == 0.0
    dyna.backward()  # teachers are detached: only the students get gradients
    assert states[0].grad is not None and states[3].grad is None and states[2].grad is None
    assert bool((states[0].grad[0, 2] == 0).all())  # the padded position does not count


def test_total_loss_by_hand():
    # V = 2, T = 3, one row: CE at t = 0, 1 of the next token
    shallow = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    deep = torch.tensor([[[0.0, 3.0], [1.0, 1.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.ones(1, 3, dtype=torch.long)

    def ce(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    ce_s = (ce([2.0, 0.0], 1) + ce([0.0, 1.0], 0)) / 2
    ce_d = (ce([0.0, 3.0], 1) + ce([1.0, 1.0], 0)) / 2
    states = _states([2.0, 0.0, 3.0, 2.5])
    parts = free_losses(shallow, deep, states, ids, mask, 2, "last", 0.5)
    # "last" on these states (test_layer_kd_terms_by_hand): (2.5 - 0)^2 on the two tokens
    # there, and the third token is real here with equal states (100) at both depths
    kd = (6.25 + 6.25 + 0.0) / 3
    assert float(parts["ce_shallow"]) == pytest.approx(ce_s)
    assert float(parts["ce_deep"]) == pytest.approx(ce_d)
    assert float(parts["total"].detach()) == pytest.approx((2 * ce_s + 4 * ce_d) / 6 + 0.5 * kd)


def test_schedule():
    assert [lr_at(s, 4, 1.0, 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_at(s, 6, 1.0, 2) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def random_texts(n: int = 24, length: int = 16, seed: int = 0) -> list[list[int]]:
    """Counting sequences from random starts (learnable: the next id is the id + 1)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, VOCAB - length, (n,), generator=g).tolist()
    return [list(range(s, s + length)) for s in starts]


def test_recipe_trains_the_whole_decoder_and_its_first_loss_is_the_equation():
    lm = tiny_lm("llama", damp=1.0)
    ref = copy.deepcopy(lm)
    before = {n: p.clone() for n, p in lm.named_parameters()}
    texts = random_texts()
    opts = dict(shallow_layer=2, steps=30, lr=1e-2, batch_size=8, seq_len=16, progress=False)
    result = tune_free(lm, texts, **opts)
    assert result.steps == 30 and list(result.after) == [2]
    hist = result.loss_history
    assert sum(hist[-5:]) / 5 < 0.7 * sum(hist[:5]) / 5
    assert all(v >= 0 for v in result.part_history["kd"])
    assert result.after[2] > result.before[2]  # the shallow model learns too
    assert all(not torch.equal(before[n], p) for n, p in lm.named_parameters()
               if n.startswith("model.layers."))
    assert all(p.requires_grad for p in lm.parameters()) and not lm.training  # restored
    # step 0 = the module docstring's loss on the first batch, before any update
    bb = ew.wrap_backbone(ref)
    train, _ = split_holdout(tokenize_texts(texts, None, 16, VOCAB), 0.1, 0)
    ids, mask = batch_at_step(train, 0, 8, 0, 0)
    with torch.no_grad():
        shallow, deep, states = shallow_deep_forward(bb, None, 2, ids, mask)
        want = free_losses(shallow, deep, states, ids, mask, 2, "dyna", 0.5)
    assert hist[0] == pytest.approx(float(want["total"]), rel=1e-5)
    assert result.part_history["ce_shallow"][0] == pytest.approx(float(want["ce_shallow"]), rel=1e-5)


def test_multi_exit_model_head_trains_and_resume_is_exact(tmp_path, monkeypatch):
    def model():
        lm = tiny_lm("llama", damp=1.0)
        cfg = ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                            head_kwargs={"adapter": "mlp"}, final_head_kwargs={})
        return ew.attach_exits(lm, cfg)

    texts = random_texts(n=12)
    opts = dict(steps=6, lr=3e-3, batch_size=4, seq_len=16, progress=False, save_every=2)
    full_model = model()
    head_before = {n: p.clone() for n, p in full_model.heads[0].named_parameters()}
    full = tune_free(full_model, texts, output_dir=tmp_path / "a", **opts)
    assert list(full.after) == [2] and full_model.backbone_tuned  # the exit at 2 is L_s
    assert any(not torch.equal(head_before[n], p)
               for n, p in full_model.heads[0].named_parameters())

    save = loop.save_checkpoint

    def crash_after_step_4(folder, task, optimizer, state):
        save(folder, task, optimizer, state)
        if state["step"] == 4:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_step_4)
    with pytest.raises(RuntimeError, match="interrupted"):
        tune_free(model(), texts, output_dir=tmp_path / "b", **opts)
    monkeypatch.undo()
    resumed_model = model()
    resumed = tune_free(resumed_model, texts, output_dir=tmp_path / "b", **opts)
    assert resumed.start_step == 4 and resumed.loss_history == full.loss_history
    for (n, a), (_, b) in zip(full_model.heads[0].state_dict().items(),
                              resumed_model.heads[0].state_dict().items()):
        assert torch.equal(a, b), n


def test_clear_errors():
    lm = tiny_lm("llama")
    texts = random_texts(n=4)
    with pytest.raises(ew.ConfigError, match="shallow_layer"):
        tune_free(lm, texts, steps=1)
    with pytest.raises(ew.ConfigError, match="shallow_layer"):
        tune_free(lm, texts, shallow_layer=4, steps=1)
    with pytest.raises(ew.ConfigError, match="kd"):
        tune_free(lm, texts, shallow_layer=2, steps=1, kd="mse")
    with pytest.raises(ew.UnsupportedModelError):
        tune_free(torch.nn.Linear(2, 2), texts, shallow_layer=1, steps=1)

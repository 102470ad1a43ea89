"""LayerSkip full fine-tuning (layer dropout + early-exit loss) on tiny random causal LMs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.lmkit import EOS, PAD, VOCAB, left_padded, tiny_lm  # noqa: E402
from torch import nn

import exitwise as ew  # noqa: E402
from exitwise.backbones import HFDecoderBackbone  # noqa: E402
from exitwise.lm import LayerSkipConfig  # noqa: E402
from exitwise.lm.data import split_holdout  # noqa: E402
from exitwise.lm.objectives.layerskip import (  # noqa: E402
    early_exit_curriculum,
    early_exit_weights,
    layer_dropout_rates,
    layerskip_forward,
    next_token_ce,
    sample_layer_drops,
)


def tune_layerskip(model, texts, tokenizer=None, *, output_dir=None, resume=True,
                       progress=False, **options):
    return ew.tune_exits(model, texts, LayerSkipConfig(**options), tokenizer=tokenizer,
                         output_dir=output_dir, resume=resume, progress=progress)

QUIET = dict(progress=False)


def corpus(n_distinct: int = 4, repeats: int = 6, length: int = 16, seed: int = 0):
    """A tiny repeated corpus: ``n_distinct`` random sequences, each ``repeats`` times."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n_distinct)]
    return base * repeats


def block_list(family: str) -> str:
    """Where the HF model keeps its decoder blocks."""
    return "transformer.h" if family == "gpt2" else "model.layers"


def test_dropout_rates_rise_with_depth():
    exp = layer_dropout_rates(4, 0.2, "exp")
    lin = layer_dropout_rates(4, 0.2, "linear")
    for rates in (exp, lin):
        assert rates[0] == 0 and rates[-1] == pytest.approx(0.2)
        assert bool((rates[1:] > rates[:-1]).all())
    assert exp.tolist() == pytest.approx([0.2 * (2 ** (l / 3) - 1) for l in range(4)])
    assert lin.tolist() == pytest.approx([0.2 * l / 3 for l in range(4)])
    assert bool((exp[1:-1] < lin[1:-1]).all())  # exponential: gentler on the middle layers
    assert layer_dropout_rates(1, 0.5).tolist() == [0.0]


def test_per_row_dropout_draws_per_sample_and_skips_those_blocks_only():
    rates = layer_dropout_rates(4, 0.9, "linear")
    drop = sample_layer_drops(rates, 3, torch.Generator().manual_seed(3))
    manual = torch.rand(4, 3, generator=torch.Generator().manual_seed(3)) < rates[:, None]
    assert torch.equal(drop, manual)
    assert not drop[0].any()  # rate 0: the first block always runs
    # rows skip different blocks, so the draw is per sample, not per batch
    assert len({tuple(drop[:, b].tolist()) for b in range(3)}) == 3, drop

    for family in ("llama", "gpt2"):
        lm = tiny_lm(family, damp=1.0)
        backbone = HFDecoderBackbone(lm)
        lens = (9, 5, 7)
        ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
        mask = (torch.arange(9)[None] < torch.tensor(lens)[:, None]).long()  # right padding
        with torch.no_grad():
            out = layerskip_forward(backbone, ids, mask, drop)[3]
            full = layerskip_forward(backbone, ids, mask)[3]
        parent_name, attr = block_list(family).rsplit(".", 1)
        parent = lm.get_submodule(parent_name)
        blocks = getattr(parent, attr)
        for b, n in enumerate(lens):
            # reference: the model's own forward on the row alone, with its dropped blocks removed
            kept = [blk for l, blk in enumerate(blocks) if not drop[l, b]]
            setattr(parent, attr, nn.ModuleList(kept))
            try:
                with torch.no_grad():
                    ref, _ = backbone.reference(input_ids=ids[b : b + 1, :n])
            finally:
                setattr(parent, attr, blocks)
            torch.testing.assert_close(out[b, :n], ref[0], atol=2e-5, rtol=1e-4)
            assert not torch.allclose(out[b, :n], full[b, :n], atol=1e-3)  # something was skipped


def test_rotational_curriculum_and_loss_weights():
    on = early_exit_curriculum("rotational", 4, 8, 100, rotation_interval=3)
    assert [l for l, e in enumerate(on) if e] == [1, 4, 7]
    on5 = early_exit_curriculum("rotational", 5, 8, 100, rotation_interval=3)
    assert [l for l, e in enumerate(on5) if e] == [2, 5, 7]  # rotated; the last always on
    on6 = early_exit_curriculum("rotational", 6, 8, 100, rotation_interval=3)
    assert [l for l, e in enumerate(on6) if e] == [0, 3, 6, 7]
    # weights: cumulative depth scale, last = L + e_scale * sum(1..L-1), normalised
    w = early_exit_weights([True] * 4, 1.0)
    assert w.tolist() == pytest.approx([1 / 20, 3 / 20, 6 / 20, 10 / 20])
    w = early_exit_weights(on, 0.5)
    raw = [0, 0.5 * 3, 0, 0, 0.5 * 15, 0, 0, 8 + 0.5 * 28]
    assert w.tolist() == pytest.approx([r / sum(raw) for r in raw])
    assert early_exit_weights([True] * 4, 0.0).tolist() == [0, 0, 0, 1]

    # the recipe follows it: exits off by the curriculum have no loss at that step
    lm = tiny_lm("llama", damp=1.0)
    res = tune_layerskip(lm, corpus(), steps=4, lr=1e-3, batch_size=4, seq_len=16,
                             curriculum="rotational", rotation_interval=2, **QUIET)
    for step in range(4):
        on = early_exit_curriculum("rotational", step, 4, 4, 2)
        got = [res.part_history[str(d)][step] is not None for d in range(1, 5)]
        assert got == on


def test_layerskip_loss_is_the_weighted_sum_of_each_layers_cross_entropy():
    """sum_l w_l CE_l with CE_l read through the shared final norm + LM head, computed here
    from Hugging Face's own forward (its hidden states, and its logits for the last layer)."""
    import torch.nn.functional as F

    from exitwise.lm.objectives.layerskip import layerskip_loss

    lm = tiny_lm("llama", damp=1.0).eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    w = early_exit_weights([True, False, True, True], 1.0)  # layer 1 off: no term for it
    with torch.no_grad():
        total, parts = layerskip_loss(HFDecoderBackbone(lm), ids, mask, None, w)
        out = lm(input_ids=ids, output_hidden_states=True)
    assert sorted(parts) == [0, 2, 3]

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    with torch.no_grad():
        want = {0: ce(lm.lm_head(lm.model.norm(out.hidden_states[1]))),
                2: ce(lm.lm_head(lm.model.norm(out.hidden_states[3]))), 3: ce(out.logits)}
    for l, v in want.items():
        assert float(parts[l]) == pytest.approx(float(v), rel=1e-5), l
    assert float(total) == pytest.approx(sum(float(w[l]) * float(v) for l, v in want.items()),
                                         rel=1e-5)


def test_gradual_curriculum_enables_layers_from_last_to_first():
    L, T = 4, 16  # one more layer every T / (2L) = 2 steps
    seen = [early_exit_curriculum("gradual", t, L, T) for t in range(T)]
    assert [l for l, e in enumerate(seen[0]) if e] == [3]
    assert [l for l, e in enumerate(seen[1]) if e] == [3]
    assert [l for l, e in enumerate(seen[2]) if e] == [2, 3]
    assert [l for l, e in enumerate(seen[4]) if e] == [1, 2, 3]
    assert all(all(s) for s in seen[6:])
    for a, b in zip(seen, seen[1:]):  # never switches an exit off; always a suffix
        assert all(y or not x for x, y in zip(a, b))
        assert b == sorted(b)
    assert early_exit_curriculum("none", 0, L, T) == [True] * L


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_decreases_on_a_repeated_corpus(family):
    lm = tiny_lm(family, damp=1.0)
    res = tune_layerskip(lm, corpus(), steps=30, lr=3e-3, batch_size=8, seq_len=16,
                             p_max=0.2, curriculum="none", **QUIET)
    final = res.part_history["4"]
    assert len(res.loss_history) == 30 and all(math.isfinite(v) for v in res.loss_history)
    assert sum(final[-5:]) / 5 < 0.5 * sum(final[:5]) / 5
    assert sum(res.loss_history[-5:]) < 0.5 * sum(res.loss_history[:5])


def test_dropout_only_in_training_and_whole_model_trains():
    """p_max=1: the last block is skipped for every row in training, so it gets no gradient
    while every other parameter moves; the held-out agreement (eval) runs every block."""
    lm = tiny_lm("llama", damp=1.0)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    texts = corpus(n_distinct=8, repeats=1)
    res = tune_layerskip(lm, texts, steps=3, lr=1e-2, batch_size=4, seq_len=16, p_max=1.0,
                             dropout_scale="linear", curriculum="none", **QUIET)
    assert res.extras["dropout_rates"][-1] == 1.0 and res.extras["dropout_rates"][0] == 0.0
    for n, p in lm.named_parameters():
        if n.startswith("model.layers.3."):
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == flags
    assert not lm.training
    # agreement at eval == the HF model's own full forward (no block skipped)
    fresh = tiny_lm("llama", damp=1.0)
    _, held = split_holdout(texts, 0.1, 0)
    ids = torch.tensor(held)
    with torch.no_grad():
        out = fresh(input_ids=ids, output_hidden_states=True)
        hs, final = out.hidden_states, out.logits.argmax(-1)
        for d in (1, 2, 3):
            exit_top = fresh.lm_head(fresh.model.norm(hs[d])).argmax(-1)
            assert res.before[d] == pytest.approx(
                (exit_top == final).double().mean().item())


def test_resume_is_bit_identical_and_needs_no_pickle(tmp_path):
    opts = dict(lr=3e-3, batch_size=4, seq_len=16, p_max=0.5, curriculum="rotational",
                rotation_interval=2, save_every=2, **QUIET)
    texts = corpus(n_distinct=6, repeats=2)
    full_lm = tiny_lm("gpt2", damp=1.0)
    full = tune_layerskip(full_lm, texts, steps=6, output_dir=tmp_path / "a", **opts)

    tune_layerskip(tiny_lm("gpt2", damp=1.0), texts, steps=3, output_dir=tmp_path / "b", **opts)
    ckpt = tmp_path / "b" / "layerskip"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer.safetensors", "state.json", "weights.safetensors"]
    # a plain causal LM with other base weights is refused: the checkpoint would replace them
    # with another model's tuned ones (it was taken, silently, when the model came unwrapped)
    with pytest.raises(ew.CheckpointError, match="weights differ.*load it again"):
        tune_layerskip(tiny_lm("gpt2", seed=5, damp=1.0), texts, steps=6,
                       output_dir=tmp_path / "b", **opts)
    resumed_lm = tiny_lm("gpt2", damp=1.0)  # the same base weights: all else from the checkpoint
    resumed = tune_layerskip(resumed_lm, texts, steps=6, output_dir=tmp_path / "b", **opts)
    assert resumed.start_step == 3 and resumed.steps == 6
    assert resumed.loss_history == full.loss_history
    assert resumed.part_history == full.part_history
    assert resumed.after == full.after
    for (n, a), b in zip(full_lm.state_dict().items(), resumed_lm.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ew.CheckpointError, match="p_max"):
        tune_layerskip(tiny_lm("gpt2"), texts, steps=6, output_dir=tmp_path / "b",
                           **dict(opts, p_max=0.3))
    fresh = tune_layerskip(tiny_lm("gpt2", damp=1.0), texts, steps=2,
                               output_dir=tmp_path / "b", resume=False, **opts)
    assert fresh.start_step == 0 and fresh.loss_history == full.loss_history[:2]


def exit_ce(backbone, texts, depth: int) -> float:
    """Next-token CE of the shared-head exit after ``depth`` blocks, no dropout."""
    ids = torch.tensor(texts)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = layerskip_forward(backbone, ids, mask, layers=[depth - 1])[depth - 1]
        logits = backbone.lm_logits(backbone.final_norm(hidden))
    return next_token_ce(logits, ids, mask).item()


def test_early_exits_improve_and_self_speculative_stays_lossless(tmp_path):
    texts = corpus(n_distinct=6, repeats=4)
    opts = dict(steps=40, lr=3e-3, batch_size=8, seq_len=16, eval_fraction=0.2, **QUIET)
    lm = tiny_lm("llama", damp=1.0)
    model = ew.attach_exits(lm, ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                                              final_head_kwargs={}))
    res = tune_layerskip(model, texts, p_max=0.1, curriculum="rotational",
                             rotation_interval=2, **opts)
    for d in (1, 2):
        assert res.after[d] > res.before[d] + 0.1, res.table()
    # control: the same fine-tuning without LayerSkip (no exit loss, no layer dropout)
    plain = tiny_lm("llama", damp=1.0)
    tune_layerskip(plain, texts, p_max=0.0, early_exit_scale=0.0, curriculum="none", **opts)
    for d in (1, 2):
        ours = exit_ce(model.backbone, texts, d)
        theirs = exit_ce(HFDecoderBackbone(plain), texts, d)
        assert ours < 0.9 * theirs, (d, ours, theirs)  # observed ratios ~0.77, ~0.82
    assert model.backbone_tuned
    ids, mask = left_padded()
    greedy = ew.generate(model, ids, mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    spec = ew.generate(model, ids, mask, strategy="self_speculative", exit_layer=2, draft_len=3,
                       max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(spec.sequences, greedy.sequences)
    assert spec.stats.total_accepted > 0
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "backbone").is_dir()


def test_clear_errors():
    lm, texts = tiny_lm("llama"), corpus(repeats=1)
    bad = [
        (dict(p_max=1.5), "p_max"), (dict(dropout_scale="cubic"), "dropout_scale"),
        (dict(curriculum="random"), "curriculum"), (dict(rotation_interval=0), "rotation_interval"),
        (dict(early_exit_scale=-1.0), "early_exit_scale"), (dict(steps=0), "steps"),
        (dict(lr=0), "lr"), (dict(seq_len=1), "seq_len"),
        (dict(eval_fraction=1.0), "eval_fraction"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ew.ConfigError, match=match):
            tune_layerskip(lm, texts, **dict(dict(steps=2), **kwargs), **QUIET)
    with pytest.raises(ew.UnsupportedModelError, match="causal LM"):
        tune_layerskip(nn.Linear(3, 3), texts, steps=2, **QUIET)
    with pytest.raises(ew.DataError, match="empty"):
        tune_layerskip(lm, [], steps=2, **QUIET)
    with pytest.raises(ew.ConfigError, match="tokenizer"):
        tune_layerskip(lm, ["some text"], steps=2, **QUIET)

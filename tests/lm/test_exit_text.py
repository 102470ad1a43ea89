"""The ``ce`` / ``kl`` objectives (``exitwise.lm.objectives.exit_text``) on tiny random LMs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.lmkit import EOS, VOCAB, hf_greedy, tiny_lm  # noqa: E402

import exitwise as ew  # noqa: E402
from exitwise.lm import ExitCEConfig, ExitKLConfig  # noqa: E402
from exitwise.lm import data as lm_data
from exitwise.lm.objectives.exit_text import exit_ce, exit_kl, exit_text_losses  # noqa: E402


def tune_exits(model, texts, tokenizer=None, *, loss="ce", output_dir=None, resume=True,
               progress=False, self_generate_prompts=None, **options):
    """ew.tune_exits with the config of ``loss`` ("ce", "kl" or "kl+ce")."""
    if self_generate_prompts is not None:
        options["prompts"] = self_generate_prompts
    config = (ExitCEConfig(**options) if loss == "ce"
              else ExitKLConfig(ce_weight=1.0 if loss == "kl+ce" else 0.0, **options))
    return ew.tune_exits(model, texts, config, tokenizer=tokenizer, output_dir=output_dir,
                         resume=resume, progress=progress)


def lm_model(family: str = "gpt2", adapter: str = "mlp", layers=(1, 2), seed: int = 0):
    """A 4-layer tiny LM, undamped and with a sharpened LM head (peaked distributions, so
    top-1 agreement is meaningful), with ``lm`` exits at ``layers``."""
    lm = tiny_lm(family, seed=seed, damp=1.0)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(20.0)
    config = ew.ExitConfig(
        layers=list(layers), head="lm", num_labels=VOCAB, head_kwargs={"adapter": adapter},
        final_head_kwargs={},
    )
    return ew.attach_exits(lm, config)


def random_texts(n: int = 48, length: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


class CharTokenizer:
    """Characters -> ids in [3, VOCAB); pad 0 (enough to exercise the string paths)."""

    pad_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


def head_params(model, k):
    return {n: p.detach().clone() for n, p in model.heads[k].named_parameters()}


@pytest.mark.parametrize("family,adapter", [("gpt2", "mlp"), ("llama", "block"),
                                            ("llama", "kangaroo")])
def test_tuning_lowers_loss_and_raises_agreement_with_a_frozen_backbone(family, adapter):
    model = lm_model(family, adapter)
    backbone_before = {n: t.clone() for n, t in model.backbone.model.state_dict().items()}
    heads_before = [head_params(model, k) for k in range(model.num_exits)]
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()

    result = tune_exits(  # distillation to the final layer is what raises agreement
        model, random_texts(), steps=100, lr=3e-3, batch_size=8, seq_len=24, progress=False,
        eval_fraction=0.25, loss="kl",
    )

    hist = result.loss_history
    assert len(hist) == 100 and result.start_step == 0
    assert sum(hist[-10:]) / 10 < 0.7 * sum(hist[:10]) / 10
    assert list(result.after) == [1, 2]
    for d in (1, 2):
        assert result.after[d] > result.before[d] + 0.05, result.table()
        assert len(result.part_history[str(d)]) == 100
    # backbone (incl. shared final norm / LM head) bit-identical
    for n, t in model.backbone.model.state_dict().items():
        assert torch.equal(t, backbone_before[n]), n
    # every trainable piece of the tuned exits moved (Kangaroo's copied block keeps a norm that
    # fed the removed feed-forward: it gets no gradient); the final head has none
    inert = "block.post_attention_layernorm.weight" if adapter == "kangaroo" else None
    for k in (0, 1):
        after = head_params(model, k)
        assert after and all(not torch.equal(after[n], heads_before[k][n])
                             for n in after if n != inert)
    assert heads_before[2] == {}
    # requires_grad and train/eval modes restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    assert model.training and model.backbone.model.training


def test_string_texts_and_loss_variants_add_up():
    """kl+ce at step 0 is kl + ce (same start weights, same first batch)."""
    texts = ["the cat sat on the mat and looked around " * 2, "hello world, how are you?"] * 6
    tok = CharTokenizer()
    first = {}
    for loss in ("kl", "ce", "kl+ce"):
        res = tune_exits(
            lm_model("llama", "norm", layers=(2,)), texts, tok, steps=3, seq_len=16,
            batch_size=4, loss=loss, progress=loss == "kl",
        )
        assert all(torch.isfinite(torch.tensor(res.loss_history)))
        first[loss] = res.part_history["2"][0]
    assert first["ce"] > first["kl"] > 0
    assert first["kl+ce"] == pytest.approx(first["kl"] + first["ce"], rel=1e-5)


def test_default_loss_is_ee_tunings_next_token_cross_entropy():
    """EE-Tuning's objective: per exit, mean over real positions with a real next token of
    -log softmax(exit logits)[next token]; checked on hand-made logits."""
    import inspect
    import math

    assert inspect.signature(ew.tune_exits).parameters["config"].default == "ce"
    # V = 3, two rows of 3 positions, the second row padded after 2 tokens
    logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]],
                           [[0.5, 0.5, 0.0], [9.0, 9.0, 9.0], [7.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 2], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])

    def nll(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    want = (nll([1.0, 0.0, 0.0], 1) + nll([0.0, 2.0, 0.0], 2) + nll([0.5, 0.5, 0.0], 0)) / 3
    final = torch.randn(2, 3, 3)  # the teacher plays no part in "ce"
    got = exit_text_losses([logits], final, ids, mask, kl_weight=0.0, ce_weight=1.0)
    assert got.shape == (1,) and float(got[0]) == pytest.approx(want)
    assert float(exit_ce(logits, ids, mask)) == pytest.approx(want)
    # a draft vocabulary of ids (2, 0): targets outside it are ignored, inside re-indexed
    where = torch.tensor([1, -100, 0])
    sub = logits[..., [2, 0]]
    want_sub = (nll([0.0, 0.0], 0) + nll([0.0, 0.5], 1)) / 2  # targets 2 (row 0), 0 (row 1)
    assert float(exit_ce(sub, ids, mask, where)) == pytest.approx(want_sub)
    result = ew.tune_exits(lm_model("llama", "norm", layers=(2,)), random_texts(n=8),
                           progress=False)
    assert result.objective == "ce" and result.steps == ExitCEConfig().steps


def test_kl_is_the_final_layers_divergence_from_the_exit_by_hand():
    """KL(p_final || p_exit) per real token, averaged; with a draft vocabulary the teacher is
    the final distribution restricted to those ids and renormalised."""
    import math

    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    final = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    mask = torch.tensor([[1, 0]])  # only the first position is real

    def softmax(v):
        z = sum(math.exp(x) for x in v)
        return [math.exp(x) / z for x in v]

    p, q = softmax([2.0, 0.0, 0.0]), softmax([0.0, 1.0, 2.0])
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert float(exit_kl(logits, final, mask)) == pytest.approx(want, rel=1e-6)
    ids = torch.tensor([0, 2])  # K = 2: teacher softmax([2, 0]), student softmax of its logits
    p, q = softmax([2.0, 0.0]), softmax([0.0, 1.0])
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert float(exit_kl(logits[..., :2], final, mask, ids)) == pytest.approx(want, rel=1e-6)


def test_self_generation_builds_data_and_reuses_its_cache(tmp_path, monkeypatch):
    tok = CharTokenizer()
    opts = dict(
        steps=4, batch_size=8, seq_len=96, num_generations=2, gen_tokens=6, progress=False,
        output_dir=tmp_path, resume=False,
    )
    first = tune_exits(lm_model("llama", "norm", layers=(2,)), None, tok, **opts)
    assert first.extras["self_generated"] and not first.extras["reused_generation_cache"]
    n_prompts = len(lm_data.DEFAULT_PROMPTS)
    assert first.num_train + first.num_eval == 2 * n_prompts
    cache = tmp_path / lm_data.SELF_GEN_CACHE
    assert cache.is_file()
    seqs = __import__("json").loads(cache.read_text())["sequences"]
    # each is prompt + up to 6 new tokens; generation 0 is the model's greedy continuation
    prompt0 = tok(lm_data.DEFAULT_PROMPTS[0])["input_ids"]
    assert seqs[0][: len(prompt0)] == prompt0 and len(prompt0) < len(seqs[0]) <= len(prompt0) + 6
    lm = lm_model("llama", "norm", layers=(2,)).backbone.model
    ids = torch.tensor([prompt0])
    ref = hf_greedy(lm, ids, torch.ones_like(ids), 6, eos=EOS)[0].tolist()
    assert seqs[0] == ref[: len(seqs[0])]

    def boom(*a, **k):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(lm_data, "generate_sequences", boom)
    again = tune_exits(lm_model("llama", "norm", layers=(2,)), None, tok, **opts)
    assert again.extras["reused_generation_cache"]
    assert again.loss_history == first.loss_history
    monkeypatch.undo()
    changed = lm_model("llama", "norm", layers=(2,))  # other weights: its own continuations
    with torch.no_grad():
        next(changed.backbone.parameters()).add_(0.01)
    assert not tune_exits(changed, None, tok, **opts).extras["reused_generation_cache"]
    # token-id prompts need no tokenizer; a different key regenerates
    monkeypatch.undo()
    ids = tune_exits(
        lm_model("llama", "norm", layers=(2,)), None, None,
        self_generate_prompts=[[5, 6, 7], [8, 9, 10, 11], [12, 13]], **opts,
    )
    assert not ids.extras["reused_generation_cache"]
    assert ids.num_train + ids.num_eval == 6


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path):
    opts = dict(lr=3e-3, batch_size=8, seq_len=24, progress=False, save_every=4)
    texts = random_texts(n=20)
    full_model = lm_model("gpt2", "mlp")
    full = tune_exits(full_model, texts, steps=12, output_dir=tmp_path / "a", **opts)

    part_model = lm_model("gpt2", "mlp")
    part = tune_exits(part_model, texts, steps=8, output_dir=tmp_path / "b", **opts)
    ckpt = tmp_path / "b" / "ce"
    # no pickle: weights and optimizer tensors in safetensors, the rest in JSON
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer.safetensors", "state.json", "weights.safetensors"]
    assert set(json.loads((ckpt / "state.json").read_text())["optimizer"]) == {
        "param_groups", "scalars"}
    resumed_model = lm_model("gpt2", "mlp")  # fresh heads: all state comes from the checkpoint
    resumed = tune_exits(resumed_model, texts, steps=12, output_dir=tmp_path / "b", **opts)

    assert part.steps == 8 and resumed.start_step == 8 and resumed.steps == 12
    assert resumed.loss_history == full.loss_history
    assert resumed.before == full.before
    assert resumed.after == full.after
    for k in (0, 1):
        a, b = head_params(full_model, k), head_params(resumed_model, k)
        assert all(torch.equal(a[n], b[n]) for n in a)
    # a base model with other weights at the same place is refused (its exits were tuned
    # for the old weights); the check reads the weights as given, before any checkpoint
    other = lm_model("gpt2", "mlp")
    with torch.no_grad():
        next(other.backbone.parameters()).add_(0.01)
    with pytest.raises(ew.CheckpointError, match="weights"):
        tune_exits(other, texts, steps=12, output_dir=tmp_path / "b", **opts)
    # a checkpoint of other exits is refused
    with pytest.raises(ew.CheckpointError, match="exit_layers"):
        tune_exits(lm_model("gpt2", "mlp", layers=(2,)), texts, steps=12,
                   output_dir=tmp_path / "b", **opts)
    # resume=False starts over
    fresh = tune_exits(lm_model("gpt2", "mlp"), texts, steps=2, output_dir=tmp_path / "b",
                       resume=False, **opts)
    assert fresh.start_step == 0 and fresh.loss_history == full.loss_history[:2]


def test_clear_errors():
    texts = random_texts(n=4)
    model = lm_model("llama", "norm")
    with pytest.raises(ew.UnsupportedModelError, match="MultiExitModel"):
        tune_exits(tiny_lm("llama"), texts, steps=2)
    with pytest.raises(ew.ConfigError, match="no intermediate 'lm' exit"):
        tune_exits(lm_model("llama", "norm", layers=(4,)), texts, steps=2)
    with pytest.raises(ew.ConfigError, match="nothing to train"):
        tune_exits(lm_model("llama", "none"), texts, steps=2)
    with pytest.raises(ew.DataError, match="empty"):
        tune_exits(model, [], steps=2)
    with pytest.raises(ew.DataError, match="at least 2 tokens"):
        tune_exits(model, [[5], []], steps=2)
    with pytest.raises(ew.DataError, match="outside"):
        tune_exits(model, [[5, VOCAB + 3]], steps=2)
    with pytest.raises(ew.ConfigError, match="tokenizer"):
        tune_exits(model, ["some text"], steps=2)
    with pytest.raises(ew.ConfigError, match="unknown objective 'mse'"):
        ew.tune_exits(model, texts, "mse")
    with pytest.raises(ew.ConfigError, match="has no option epochs"):
        ew.lm.get_objective("ce", epochs=3)
    with pytest.raises(TypeError):
        ExitCEConfig(epochs=3)  # a config has exactly its own options
    for bad in (0, -3, 2.5):
        with pytest.raises(ew.ConfigError, match="steps"):
            tune_exits(model, texts, steps=bad)
    with pytest.raises(ew.ConfigError, match="lr"):
        tune_exits(model, texts, steps=2, lr=0)
    # GPT-2's learned positions (64 here): windows past them were clamped to the last row
    with pytest.raises(ew.ConfigError, match="64 positions"):
        tune_exits(lm_model("gpt2", "norm"), random_texts(n=4, length=100), steps=2,
                   seq_len=128)
    tune_exits(lm_model("gpt2", "norm"), random_texts(n=4, length=100), steps=1, seq_len=64)


def test_a_batch_with_no_target_in_the_draft_vocabulary_is_a_no_op_step():
    # a 5-token draft vocabulary and one short text per step: some steps have no target the
    # exit can draft; their loss is a zero that keeps the graph (it once failed at backward)
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, VOCAB, (4,), generator=g).tolist() for _ in range(30)]
    model = ew.attach_exits(tiny_lm("llama", damp=1.0), ew.ExitConfig(
        layers=[2], head="lm", num_labels=VOCAB, final_head_kwargs={},
        head_kwargs={"adapter": "mlp", "draft_vocab": 5}))
    result = ew.tune_exits(model, texts, ExitCEConfig(steps=20, batch_size=1, seq_len=4),
                           progress=False)
    assert result.steps == 20 and 0.0 in result.loss_history
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = exit_text_losses([logits], torch.randn(1, 3, VOCAB), torch.tensor([[7, 8, 9]]),
                            torch.ones(1, 3, dtype=torch.long), 0.0, 1.0,
                            [torch.arange(5)])
    assert loss.tolist() == [0.0] and loss.requires_grad

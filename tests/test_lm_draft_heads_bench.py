"""The draft-head comparison (``benchmarks/lm_draft_heads.py``) on a tiny chat LM: every
variant tuned on the same cached answers and reported, the old warm start reproduced exactly,
the EAGLE probes starting exactly as the heads they extend, finished variants skipped on a
rerun, and a clear error for too few answers."""

from __future__ import annotations

import json

import pytest
import torch

import exitwise as ew
from benchmarks.lm_draft_heads import add_condition, add_context_attention, main, warm_start
from exitwise.backbones.hf_decoder import DecodeContext, prompt_positions
from exitwise.recipes.lm import ANSWERS_NAME, load_lm


def _attach(lm, kwargs):
    return ew.attach_exits(lm, ew.ExitConfig(
        layers=[1], head="lm", num_labels=lm.config.vocab_size,
        head_kwargs={**kwargs, "draft_vocab": 32}, final_head_kwargs={}))


def test_eagle_probes_start_as_the_heads_they_extend_and_then_learn(tiny_lm_dir):
    lm, _ = load_lm(str(tiny_lm_dir))
    torch.manual_seed(0)
    hidden_size = lm.config.hidden_size
    hidden, condition = torch.randn(2, 5, hidden_size), torch.randn(2, 5, hidden_size)
    ctx = DecodeContext(None, prompt_positions(torch.ones(2, 5, dtype=torch.long)),
                        torch.ones(2, 5, dtype=torch.long))
    model = _attach(lm, {"adapter": "mlp", "conditioned": True})
    head = model.heads[0]
    with torch.no_grad():  # a trained-looking MLP and fuse, so "starts as" means something
        for p in (head.mlp.fc2.weight, head.fuse.weight):
            p.normal_(0, 0.05)
        model.backbone.norm.weight.mul_(1.5)  # a final norm away from the fresh one's identity
        before = head.compact_logits(hidden, ctx, condition)
    add_context_attention(head, model.backbone)
    assert head.block is not None and head.uses_cache
    with torch.no_grad():
        after = head.compact_logits(hidden, ctx, condition)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    after = head.compact_logits(hidden, ctx, condition)  # the attention gets a gradient
    after.logsumexp(-1).sum().backward()
    assert head.block.self_attn.o_proj.weight.grad.abs().sum() > 0

    plain = _attach(lm, {"adapter": "kangaroo"}).heads[0]
    with torch.no_grad():
        unconditioned = plain.compact_logits(hidden, ctx)
    add_condition(plain, plain._backbone)
    assert plain.conditioned and plain.fuse.weight.abs().sum() == 0
    out = plain.compact_logits(hidden, ctx, condition)
    torch.testing.assert_close(out.detach(), unconditioned, rtol=0, atol=1e-6)
    out.logsumexp(-1).sum().backward()  # the condition reaches the attention through the fuse
    assert plain.fuse.weight.grad.abs().sum() > 0


def test_warm_start_is_the_last_blocks_attention_and_the_final_norm(tiny_lm_dir):
    lm, _ = load_lm(str(tiny_lm_dir))
    vocab = lm.config.vocab_size
    model = ew.attach_exits(lm, ew.ExitConfig(layers=[1], head="lm", num_labels=vocab,
                                              head_kwargs={"adapter": "kangaroo"},
                                              final_head_kwargs={}))
    head, bb = model.heads[0], model.backbone
    last = bb.blocks[bb.num_layers - 1].state_dict()
    assert not torch.equal(head.block.state_dict()["self_attn.q_proj.weight"],
                           last["self_attn.q_proj.weight"])  # fresh by default
    with torch.no_grad():  # a final norm away from identity, so copying it shows
        bb.norm.weight.mul_(1.5)
    warm_start(head, bb)
    for name, value in head.block.state_dict().items():
        assert torch.equal(value, last[name]), name
    assert torch.equal(head.norm.weight, bb.norm.weight)


def test_variants_tuned_reported_and_resumed(tiny_lm_dir, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    items = [[torch.randint(3, 60, (6,), generator=g).tolist(),
              torch.randint(3, 60, (10,), generator=g).tolist()] for _ in range(24)]
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / ANSWERS_NAME).write_text(json.dumps({"key": "test", "items": items}))
    out = tmp_path / "heads.json"
    args = ["--answers-from", str(folder), "--answers", "24", "--model", str(tiny_lm_dir),
            "--exit-layer", "1", "--draft-vocab", "32", "--epochs", "1", "--threads", "1",
            "--variants", "mlp,kangaroo_warm,mlp_attn_conditioned,block_conditioned",
            "--out", str(out), "--work", str(tmp_path / "w")]
    report = main(args)
    assert set(report["variants"]) == {"mlp", "kangaroo_warm", "mlp_attn_conditioned",
                                       "block_conditioned"}
    assert report["benchmark_prompts"] == 24 and report["benchmark_answer_tokens"] > 0
    for row in report["variants"].values():
        assert 0.0 <= row["held_out_agreement"] <= 1.0
        assert 0.0 <= row["bench_agreement"] <= 1.0
        assert row["trainable_parameters"] > 0
    assert report["variants"]["kangaroo_warm"]["warm_start"] is True
    assert report["variants"]["mlp_attn_conditioned"]["built_by"] == "add_context_attention"
    assert report["variants"]["mlp"]["built_by"] is None
    assert all(row["command"] == report["command"] for row in report["variants"].values())
    saved = json.loads(out.read_text())
    assert saved["variants"] == report["variants"]
    def no_tuning(*_a, **_k):
        raise AssertionError("a finished variant was tuned again")

    monkeypatch.setattr(ew, "tune_exits", no_tuning)
    again = main(args)  # finished variants are read back, not tuned again
    assert again["variants"] == report["variants"]
    with pytest.raises(SystemExit, match="other settings"):  # no mixing of settings
        main([*args[:10], "--epochs", "2", *args[12:]])
    with pytest.raises(SystemExit, match="holds 24 answers"):
        main([*args[:2], "--answers", "25", *args[4:]])
    with pytest.raises(SystemExit, match="unknown variants"):
        main([*args[:-4], "--variants", "eagle", "--out", str(out)])

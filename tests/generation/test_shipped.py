"""Shipped drafters (``exitwise.generation.shipped``): found by the exact weights they were
tuned for, used by ``generate(..., strategy="self_speculative")`` on a plain LM with their
measured options (options given win), lossless; and the drafters the package ships are
complete."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.lmkit import EOS, PAD, VOCAB, left_padded, tiny_lm

import exitwise as ew
import exitwise.generation.shipped as shipped
from exitwise.generation.shipped import find_drafter, fingerprint, same_model, shipped_drafters


def ship(tmp_path, lm, layer=2, options=None):
    """A drafter folder for ``lm`` under tmp_path/drafters (as benchmarks/ship_drafter.py)."""
    config = ew.ExitConfig(layers=[layer], head="lm", num_labels=VOCAB,
                           head_kwargs={"adapter": "mlp"}, final_head_kwargs={})
    multi = ew.attach_exits(lm, config)
    with torch.no_grad():
        for p in multi.heads[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "drafters" / "tiny"
    multi.save_pretrained(folder)
    meta = {"fingerprint": fingerprint(multi.backbone), "exit_layer": layer,
            "options": options or {}}
    (folder / "drafter.json").write_text(json.dumps(meta))
    return tmp_path / "drafters", multi


def test_fingerprint_matches_only_the_same_weights():
    a, b = tiny_lm("llama"), tiny_lm("llama")
    fa = fingerprint(ew.wrap_backbone(a))
    assert same_model(fa, fingerprint(ew.wrap_backbone(b)))
    with torch.no_grad():
        b.get_input_embeddings().weight[3, 5] += 1e-3
    assert not same_model(fa, fingerprint(ew.wrap_backbone(b)))
    assert not same_model(fa, fingerprint(ew.wrap_backbone(tiny_lm("llama", seed=1))))
    assert not same_model(fa, fingerprint(ew.wrap_backbone(tiny_lm("qwen2"))))
    # the same weights loaded in bfloat16 or float16 match
    for dtype in (torch.bfloat16, torch.float16):
        assert same_model(fa, fingerprint(ew.wrap_backbone(tiny_lm("llama").to(dtype))))
    # a fine-tune that leaves the embedding alone does not (every block's weights x 1.05)
    tuned = tiny_lm("llama")
    with torch.no_grad():
        for layer in tuned.model.layers:
            for p in layer.parameters():
                p.mul_(1.05)
    assert not same_model(fa, fingerprint(ew.wrap_backbone(tuned)))


def test_generate_uses_the_shipped_drafter_of_a_plain_lm(tmp_path, monkeypatch):
    lm = tiny_lm("llama")
    root, multi = ship(tmp_path, lm, layer=2, options={"draft_len": "auto", "ngram": 3})
    monkeypatch.setattr(shipped, "ASSETS", root)
    found = find_drafter(ew.wrap_backbone(lm))
    assert found is not None and found.exit_layer == 2
    assert find_drafter(ew.wrap_backbone(lm)) is found  # looked up once per weights
    saved = lm.model.layers[0].mlp.up_proj.weight.detach().clone()
    with torch.no_grad():  # tuned in place: the cached answer is not reused
        lm.model.layers[0].mlp.up_proj.weight.mul_(1.05)
    assert find_drafter(ew.wrap_backbone(lm)) is None
    with torch.no_grad():
        lm.model.layers[0].mlp.up_proj.weight.copy_(saved)
    assert find_drafter(ew.wrap_backbone(lm)) is not None
    lm.model.layers[1].mlp.up_proj.weight.data.mul_(1.5)  # through .data: no version bump
    assert find_drafter(ew.wrap_backbone(lm)) is None
    lm.model.layers[1].mlp.up_proj.weight.data.div_(1.5)
    assert find_drafter(ew.wrap_backbone(lm)) is not None
    ids, mask = left_padded()
    ref = ew.generate(lm, ids, mask, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    out = ew.generate(lm, ids, mask, strategy="self_speculative", max_new_tokens=16,
                      eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref.sequences)
    s = out.stats
    assert s.exit_layer == 2 and s.draft_len == 8  # "auto" up to max_draft_len
    assert s.head_applications > 0
    # the same drafts as through the shipped heads attached by hand
    by_hand = ew.generate(multi, ids, mask, strategy="self_speculative", exit_layer=2,
                          draft_len="auto", ngram=3, max_new_tokens=16, eos_token_id=EOS,
                          pad_token_id=PAD)
    assert by_hand.stats.total_drafted > 0
    # options given win over the shipped ones
    fixed = ew.generate(lm, ids, mask, strategy="self_speculative", draft_len=2, ngram=0,
                        max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(fixed.sequences, ref.sequences)
    assert fixed.stats.draft_len == 2 and fixed.stats.ngram_drafted == 0
    assert set(fixed.stats.step_draft_lengths) <= {0, 1, 2}
    # another model's weights: no drafter, a clear error
    with pytest.raises(ew.ConfigError, match="no drafter is shipped"):
        ew.generate(tiny_lm("llama", seed=2), ids, mask, strategy="self_speculative")


def test_a_multi_exit_model_drafts_with_its_shallowest_lm_exit():
    lm = tiny_lm("gpt2")
    multi = ew.attach_exits(lm, ew.ExitConfig(layers=[1, 3], head="lm", num_labels=VOCAB,
                                              final_head_kwargs={}))
    ids, mask = left_padded()
    out = ew.generate(multi, ids, mask, strategy="self_speculative", max_new_tokens=10,
                      eos_token_id=EOS, pad_token_id=PAD)
    assert out.stats.exit_layer == 1
    ref = ew.generate(lm, ids, mask, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref.sequences)


def test_the_packages_own_drafters_are_complete():
    """Every drafter the package ships has its exits, a fingerprint and its provenance."""
    for d in shipped_drafters():
        assert (d.folder / "exit_config.json").is_file()
        assert (d.folder / "exit_heads.safetensors").is_file()
        fp = d.meta["fingerprint"]
        assert {"model_type", "num_layers", "weights_bf16_sha256", "weights_f16_sha256"} <= set(fp)
        assert 1 <= d.exit_layer < fp["num_layers"]
        assert d.meta["source"]["command"]


def test_lookup_of_weights_made_in_inference_mode_or_not_loaded():
    with torch.inference_mode():  # inference tensors have no version counter
        lm = tiny_lm("llama")
    assert find_drafter(ew.wrap_backbone(lm)) is None
    with torch.device("meta"):
        empty = tiny_lm("llama")
    assert find_drafter(ew.wrap_backbone(empty)) is None

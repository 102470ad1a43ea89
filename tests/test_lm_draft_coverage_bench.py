"""The draft-coverage count (``benchmarks/lm_draft_coverage.py``) on a tiny chat LM with a
feature-conditioned exit over a 16-token draft vocabulary: its shares equal a direct count."""

from __future__ import annotations

import json

import torch

import exitwise as ew
from benchmarks.lm_draft_coverage import main
from exitwise.lm import agreement_on_answers
from exitwise.recipes.lm import load_lm


def test_shares_equal_a_direct_count(tiny_lm_dir, tmp_path):
    lm, tok = load_lm(str(tiny_lm_dir))
    vocab = int(lm.config.vocab_size)
    torch.manual_seed(0)
    model = ew.attach_exits(lm, ew.ExitConfig(
        layers=[2], head="lm", num_labels=vocab, final_head_kwargs={},
        head_kwargs={"adapter": "mlp", "draft_vocab": 16, "conditioned": True}))
    with torch.no_grad():  # a head that is not the identity, and a subset not 0..15
        model.heads[0].mlp.fc2.weight.normal_(0, 0.5)
        model.heads[0].fuse.weight.normal_(0, 0.5)
        model.heads[0].set_draft_vocab(torch.randperm(vocab)[:16])
    folder = tmp_path / "tuned"
    model.save_pretrained(folder)
    tok.save_pretrained(str(folder))
    cache = tmp_path / "answers.json"
    tuning = tmp_path / "tuning.json"
    tuning.write_text(json.dumps({"items": [[[1], [5, 5, 6]], [[1], [7]]]}))
    report = main(["--model", str(folder), "--prompts", "3", "--new-tokens", "6",
                   "--answers-cache", str(cache), "--tuning-answers", str(tuning),
                   "--vocab-sizes", "1,3", "--threads", "1", "--out",
                   str(tmp_path / "r.json")])
    answers = json.loads(cache.read_text())["items"]
    tokens = [t for _, a in answers for t in a]
    ids = set(model.heads[0].vocab_ids.tolist())
    assert report["answer_tokens"] == len(tokens) and report["drafter"] == str(folder)
    assert report["in_draft_vocab"] == sum(t in ids for t in tokens) / len(tokens)
    pairs = [(list(p), list(a)) for p, a in answers]
    assert report["top_k"]["1"] == agreement_on_answers(model, pairs, progress=False)[2]
    tops = [report["top_k"][k] for k in ("1", "2", "4", "8")]
    assert tops == sorted(tops) and tops[-1] <= report["in_draft_vocab"]
    assert sum(g["tokens"] for g in report["by_confidence"]) == len(tokens)
    assert report["frequency_coverage"] == {
        "1": sum(t == 5 for t in tokens) / len(tokens),
        "3": sum(t in (5, 6, 7) for t in tokens) / len(tokens)}
    assert json.loads((tmp_path / "r.json").read_text())["top_k"] == report["top_k"]

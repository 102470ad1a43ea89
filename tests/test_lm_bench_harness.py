"""The LM benchmark harness (``benchmarks/lm_bench.py``) on a tiny tuned LM: every method's
entry per batch size, lossless methods matching HF greedy, the summary for every batch size,
CALM rows, and the rotated order in which methods run."""

from __future__ import annotations

import json

import pytest
from benchmarks.lm_bench import (
    Method,
    bench_lm,
    main,
    merge_stats,
    parse_configs,
    parse_drafters,
    time_methods,
)

from exitwise.errors import ConfigError
from exitwise.policies import get_policy
from exitwise.recipes.lm import TuneLMJob, load_lm, run_tune_lm


@pytest.fixture(scope="module")
def tuned(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    run_tune_lm(TuneLMJob(out_dir=str(out), model=str(tiny_lm_dir), exit_layers=[2],
                          objective="kl",
                          options={"steps": 5, "batch_size": 4, "seq_len": 32}, gen_tokens=8,
                          num_generations=1),
                print_fn=lambda *a: None)
    return out


def test_every_method_per_batch_size_and_the_summary(tuned, tmp_path):
    bench_json = tmp_path / "bench.json"
    main([str(tuned), "--configs", "2:3", "--batch-sizes", "1,4", "--max-new-tokens", "8",
          "--repeats", "1", "--limit", "5", "--stock-configs", "2:3", "--out", str(bench_json),
          "--drafters", "anpd,auto@2,ngram@2:auto"])
    bench = json.loads(bench_json.read_text())
    b1, b4 = bench["batch_sizes"]["1"], bench["batch_sizes"]["4"]
    drafters = {"draft@anpd", "draft@auto@2", "draft@ngram@2:auto"}
    ours = {"hf_greedy", "exitwise_greedy", "exitwise_greedy_stock", "self_spec@2:3",
            "self_spec_stock@2:3"} | drafters
    assert set(b1) == ours | {"hf_assistant@2:3"}
    assert set(b4) == ours  # HF's assistant: batch 1 only
    assert b1["hf_greedy"]["exact_match"] == 1.0 and b1["hf_greedy"]["new_tokens"] > 0
    # exitwise's decoders are lossless: same tokens as HF greedy, on either kernel
    for name in ("exitwise_greedy", "exitwise_greedy_stock", "self_spec@2:3",
                 "self_spec_stock@2:3", *drafters):
        assert b1[name]["exact_match"] == 1.0 and b4[name]["exact_match"] == 1.0, name
    assert 0.0 <= b1["self_spec@2:3"]["acceptance_rate"] <= 1.0
    s = bench["summary"]
    for key in ("hf_greedy_tps", "hf_assistant_tps", "self_spec_tps", "self_spec_exact_match",
                "speedup_vs_greedy", "speedup_vs_hf_assistant", "exitwise_greedy_tps",
                "speedup_vs_exitwise_greedy", "self_spec_stock_kernels_tps"):
        assert s[key] is not None and s[key] >= 0, key
    assert s["headline_batch_size"] == 1 and set(s["per_batch_size"]) == {"1", "4"}
    for bs, row in s["per_batch_size"].items():  # every batch size, none hard-coded
        entries = bench["batch_sizes"][bs]
        assert row["speedup_vs_hf_greedy"] == pytest.approx(
            entries["self_spec@2:3"]["tokens_per_s"] / entries["hf_greedy"]["tokens_per_s"])
        assert row["exact_match"] == 1.0
    assert s["speedup_vs_greedy"] == pytest.approx(s["self_spec_tps"] / s["hf_greedy_tps"])
    # the default kernels against stock ones, per batch size, with the rule stated
    assert set(s["greedy_kernels"]) == {"1", "4"}
    ratios = [k["default_vs_stock_greedy"] for k in s["greedy_kernels"].values()]
    assert s["greedy_kernels_never_slower"] == all(
        r >= 1 - s["never_slower_tolerance"] for r in ratios)
    # never_slower: every automatic drafter against exitwise greedy on stock kernels
    for bs in ("1", "4"):
        entries = bench["batch_sizes"][bs]
        stock = entries["exitwise_greedy_stock"]["tokens_per_s"]
        assert s["auto_vs_stock_greedy"][bs] == pytest.approx(
            {n: entries[n]["tokens_per_s"] / stock for n in drafters})
        best = max((n for n in entries if n.startswith(("self_spec@", "draft@"))),
                   key=lambda n: entries[n]["tokens_per_s"])
        assert s["best_lossless_per_batch_size"][bs]["method"] == best
    auto = [r for per in s["auto_vs_stock_greedy"].values() for r in per.values()]
    assert s["never_slower"] == all(r >= 1 - s["never_slower_tolerance"] for r in auto)
    assert s["best_lossless"] == s["best_lossless_per_batch_size"]["1"]
    assert s["best_lossless"]["exact_match"] == 1.0
    k1 = s["greedy_kernels"]["1"]
    assert k1["default_vs_stock_greedy"] == pytest.approx(
        b1["exitwise_greedy"]["tokens_per_s"] / b1["exitwise_greedy_stock"]["tokens_per_s"])


def test_certified_calm_policies_are_timed_beside_greedy(tuned):
    """CALM rows of the benchmark: a never-exit threshold is lossless; an always-exit one
    decodes shallower with kv='skip' and reports its consistency with greedy."""
    model, tok = load_lm(str(tuned))
    calm = {"never": get_policy("calm_softmax", threshold=1.0, tau=0.0),
            # the top-1 probability always beats 0.1; the top-2 gap need not
            "always": get_policy("calm_maxprob", threshold=0.0, tau=0.0)}
    report = bench_lm(model, tok, ["what is the sky", "a poem on the sea"], max_new_tokens=6,
                      configs=["2:2"], batch_sizes=[1, 2], repeats=1, hf_assistant=False,
                      calm=calm, calm_batch_sizes=(1, 2), print_fn=lambda *a: None)
    for bs in ("1", "2"):
        never, always = (report["batch_sizes"][bs][f"calm@{n}"] for n in ("never", "always"))
        assert never["exact_match"] == 1.0 and never["token_consistency"] == 1.0
        assert never["mean_exit_depth"] == 4 and never["early_exit_rate"] == 0.0
        assert always["early_exit_rate"] == 1.0 and always["mean_exit_depth"] == 2
        assert always["sequential_layers_per_token"] < never["sequential_layers_per_token"]
        assert "acceptance_rate" not in always
    summary = report["summary"]["calm"]
    assert set(summary) == {"calm@never", "calm@always"}
    assert summary["calm@never"]["token_consistency"] == 1.0


def test_bench_configs_parse_with_an_optional_draft_threshold():
    assert parse_configs(["6:4", "6:6:0.5", (8, 2)]) == [(6, 4, None), (6, 6, 0.5), (8, 2, None)]
    for bad in ("6", "6:4:0.5:1", "a:4"):
        with pytest.raises(ConfigError, match="EXIT:DRAFT_LEN"):
            parse_configs([bad])


def test_methods_run_in_an_order_rotated_per_chunk():
    import torch

    calls = []

    def method(name):
        def run(ids, mask):
            calls.append(name)
            return torch.zeros(1, 1, dtype=torch.long), None
        return Method(name, "lossless", "exitwise_greedy", run)

    chunks = [(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))] * 2
    time_methods([method("a"), method("b"), method("c")], chunks, repeats=2, eos=set(),
                 print_fn=lambda *a: None)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_drafter_specs():
    got = parse_drafters(["anpd:3", "auto@2/w3", "ngram@2:auto/w2", "fixed@4:1", "swift",
                          "swift:2"])
    assert got["swift"] == {"strategy": "swift", "draft_len": "auto"}
    assert got["swift:2"] == {"strategy": "swift", "draft_len": 2}
    assert got["anpd:3"] == {"strategy": "anpd", "draft_len": 3}
    assert got["auto@2/w3"] == {"strategy": "self_speculative", "exit_layer": 2,
                                "draft_len": "auto", "tree_width": 3}
    assert got["ngram@2:auto/w2"] == {"strategy": "self_speculative", "exit_layer": 2,
                                      "draft_len": "auto", "ngram": 4, "tree_width": 2}
    assert got["fixed@4:1"] == {"strategy": "self_speculative", "exit_layer": 4, "draft_len": 1}
    assert parse_drafters(["ngram@2:1/wc"])["ngram@2:1/wc"]["tree_width"] == "confidence"
    for bad in ("tree@2", "auto@x", "anpd/w2", "fixed@2:1/wx", "swift/w2", "swift:x"):
        with pytest.raises(ConfigError, match="bad drafter"):
            parse_drafters([bad])


def test_merged_stats_carry_sibling_and_ngram_shares_computed_by_hand():
    parts = [
        dict(total_drafted=10, total_accepted=4, decoded_tokens=8, new_tokens=[4, 4],
             layer_applications=80, sequential_layers=40, sibling_accepted=1, ngram_drafted=6,
             ngram_accepted=3),
        dict(total_drafted=6, total_accepted=4, decoded_tokens=4, new_tokens=[4],
             layer_applications=40, sequential_layers=40, sibling_accepted=1, ngram_drafted=0,
             ngram_accepted=0),
    ]
    got = merge_stats(parts)
    assert got["acceptance_rate"] == pytest.approx(8 / 16)
    assert got["sibling_share"] == pytest.approx(2 / 8)
    assert got["ngram_acceptance_rate"] == pytest.approx(3 / 6)
    assert got["layer_applications_per_token"] == pytest.approx(120 / 12)
    # rows decoded: 8 / 2 + 4 / 1 = 8 -> 80 sequential layers / 8
    assert got["sequential_layers_per_token"] == pytest.approx(80 / 8)
    assert merge_stats([dict(parts[1], ngram_drafted=0, total_accepted=0, total_drafted=0)])[
        "ngram_acceptance_rate"] is None
    # a layer-skipping draft model's 24 sub-layer applications are 12 blocks' work
    drafted = merge_stats([dict(parts[1], draft_sublayer_applications=24)])
    assert drafted["layer_applications_per_token"] == pytest.approx((40 + 12) / 4)

"""The decoder-LM CLI story (tune-lm -> generate -> bench-lm) on a tiny random Llama saved
like a hub checkpoint with a word-level tokenizer and a chat template (no SmolLM2, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from exitwise.cli import main

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "hat", "big", "red", "is", "hi",
         "what", "why", "how", "sky", "blue", "sea", "poem"]
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama (vocab 64) + a word-level tokenizer with a chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )
    tok.chat_template = CHAT
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    lm = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked next-token distributions: agreement is meaningful
        lm.lm_head.weight.mul_(20.0)
    lm.save_pretrained(d)
    return d


def test_tune_generate_bench(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "tuned"
    # KL to the final layer keeps this tiny exit unsure enough that calm_softmax at threshold
    # 1.0 never exits below (the check further down); CE is the default (EE-Tuning)
    args = ["tune-lm", "--model", str(tiny_lm_dir), "--exit-layer", "2", "--steps", "30",
            "--objective", "kl",
            "--adapter", "mlp", "--lr", "1e-2", "--batch-size", "4", "--seq-len", "32",
            "--gen-tokens", "16", "--generations", "1", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "tuning_report.json").read_text())
    assert report["steps"] == 30 and report["exit_layers"] == [2]
    # tuning makes the exit agree more with the final layer on held-out self-generated text
    assert report["objective"] == "kl" and report["metric"] == "agreement"
    assert report["after"]["2"] > report["before"]["2"]
    saved = json.loads((out / "exit_config.json").read_text())
    assert saved["exit_layers"] == [2, 4] and not saved["backbone_saved"]
    assert (out / "exit_heads.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    # the frozen backbone is not copied: only the head's weights are
    assert (out / "exit_heads.safetensors").stat().st_size < 100_000
    capsys.readouterr()

    # a rerun resumes from the finished checkpoint (no new steps) and reuses the generations
    assert main(args) == 0
    again = json.loads((out / "tuning_report.json").read_text())
    assert again["steps"] == 30 and again["reused_generation_cache"]
    capsys.readouterr()

    prompts = ["--prompt", "what is the sky", "--prompt", "a poem on the sea"]
    runs = {}
    for strategy in ("greedy", "self_speculative"):
        assert main(["generate", str(out), *prompts, "--strategy", strategy,
                     "--max-new-tokens", "12", "--json"]) == 0
        runs[strategy] = json.loads(capsys.readouterr().out)
    spec = runs["self_speculative"]
    # self-speculative decoding with the tuned exit (the default exit layer) gives greedy's text
    assert spec["texts"] == runs["greedy"]["texts"] and len(spec["texts"]) == 2
    assert spec["stats"]["exit_layer"] == 2 and spec["stats"]["total_drafted"] > 0
    assert all(1 <= n <= 12 for n in spec["new_tokens"])

    # CALM-style early exit with the tuned exit: an impossible threshold never exits -> greedy
    assert main(["generate", str(out), *prompts, "--strategy", "early_exit", "--policy",
                 "calm_softmax", "--threshold", "1.0", "--max-new-tokens", "12", "--json"]) == 0
    never = json.loads(capsys.readouterr().out)
    assert never["texts"] == runs["greedy"]["texts"]
    assert main(["generate", str(out), *prompts, "--strategy", "early_exit",
                 "--threshold", "0.0", "--max-new-tokens", "12", "--json"]) == 0
    always = json.loads(capsys.readouterr().out)
    assert always["stats"]["strategy"] == "early_exit" and len(always["texts"]) == 2

    # plain text output and a base model (untuned exit through the shared head) also work
    assert main(["generate", str(tiny_lm_dir), "--prompt", "hi", "--exit-layer", "3",
                 "--max-new-tokens", "5", "--no-chat"]) == 0
    captured = capsys.readouterr()
    assert "self_speculative" in captured.err and captured.out.strip() != ""

    bench_json = tmp_path / "bench.json"
    assert main(["bench-lm", str(out), "--configs", "2:3", "--batch-sizes", "1,4",
                 "--max-new-tokens", "8", "--repeats", "1", "--limit", "5",
                 "--stock-configs", "2:3", "--out", str(bench_json)]) == 0
    bench = json.loads(bench_json.read_text())
    b1, b4 = bench["batch_sizes"]["1"], bench["batch_sizes"]["4"]
    ours = {"hf_greedy", "exitwise_greedy", "exitwise_greedy_stock", "self_spec@2:3",
            "self_spec_stock@2:3"}
    assert set(b1) == ours | {"hf_assistant@2:3"}
    assert set(b4) == ours  # HF's assistant: batch 1 only
    assert b1["hf_greedy"]["exact_match"] == 1.0 and b1["hf_greedy"]["new_tokens"] > 0
    # exitwise's decoders are lossless: same tokens as HF greedy, on either kernel
    for name in ("exitwise_greedy", "exitwise_greedy_stock", "self_spec@2:3",
                 "self_spec_stock@2:3"):
        assert b1[name]["exact_match"] == 1.0 and b4[name]["exact_match"] == 1.0, name
    assert 0.0 <= b1["self_spec@2:3"]["acceptance_rate"] <= 1.0
    s = bench["summary"]
    for key in ("hf_greedy_tps", "hf_assistant_tps", "self_spec_tps", "self_spec_exact_match",
                "speedup_vs_greedy", "speedup_vs_hf_assistant", "batch4_speedup_vs_greedy",
                "exitwise_greedy_tps", "speedup_vs_exitwise_greedy",
                "self_spec_stock_kernels_tps", "batch4_speedup_vs_exitwise_greedy"):
        assert s[key] is not None and s[key] >= 0, key
    assert s["speedup_vs_greedy"] == pytest.approx(s["self_spec_tps"] / s["hf_greedy_tps"])
    # the default kernels against stock ones, per batch size, with the rule stated
    assert set(s["greedy_kernels"]) == {"1", "4"}
    ratios = [k["default_vs_stock_greedy"] for k in s["greedy_kernels"].values()]
    assert s["never_slower"] == all(r >= 1 - s["never_slower_tolerance"] for r in ratios)
    k1 = s["greedy_kernels"]["1"]
    assert k1["default_vs_stock_greedy"] == pytest.approx(
        b1["exitwise_greedy"]["tokens_per_s"] / b1["exitwise_greedy_stock"]["tokens_per_s"])


def test_bad_lm_arguments_fail_clearly(tiny_lm_dir, tmp_path, capsys):
    # a plain model has no tuned exit: self-speculative needs --exit-layer
    assert main(["generate", str(tiny_lm_dir), "--prompt", "hi", "--no-chat"]) == 2
    assert "exit-layer" in capsys.readouterr().err
    assert main(["generate", str(tiny_lm_dir), "--prompt", "hi", "--exit-layer", "9"]) == 2
    assert "exit_layer" in capsys.readouterr().err
    assert main(["bench-lm", str(tiny_lm_dir), "--configs", "2-3", "--limit", "1"]) == 2
    assert "EXIT:DRAFT_LEN" in capsys.readouterr().err
    assert main(["tune-lm", "--model", str(tiny_lm_dir), "--exit-layer", "7", "--steps", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_bench_lm_times_certified_calm_policies(tiny_lm_dir, tmp_path):
    """CALM rows of the benchmark: a never-exit threshold is lossless; an always-exit one
    decodes shallower with kv='skip' and reports its consistency with greedy."""
    from exitwise.policies import get_policy
    from exitwise.recipes.lm import TuneLMJob, load_lm, run_tune_lm
    from exitwise.recipes.lm_bench import bench_lm

    out = tmp_path / "tuned"
    run_tune_lm(TuneLMJob(out_dir=str(out), model=str(tiny_lm_dir), exit_layers=[2],
                          options={"steps": 5, "batch_size": 4, "seq_len": 32}, gen_tokens=8,
                          num_generations=1),
                print_fn=lambda *a: None)
    model, tok = load_lm(str(out))
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


def test_llm_demo_story_end_to_end(tiny_lm_dir, tmp_path):
    """`exitwise demo` on a tiny model: tunes, answers with HF greedy, exitwise greedy and
    self-speculatively, the answers are identical, the report (with the CPU it ran on) is
    written; a re-run skips the tuning."""
    from exitwise.recipes.lm_demo import run_llm_demo

    out = tmp_path / "demo"
    lines: list[str] = []
    kw = dict(out_dir=str(out), exit_layer=2, answers=16, epochs=2, draft_vocab=32,
              max_new_tokens=8,
              model=str(tiny_lm_dir), prompts=["what is the sky", "a poem on the sea"],
              print_fn=lambda *a: lines.append(" ".join(map(str, a))))
    report = run_llm_demo(**kw)
    assert report["all_identical"] and len(report["prompts"]) == 2
    assert report["speedup_vs_hf_greedy"] > 0 and 0 <= report["acceptance_rate"] <= 1
    assert set(report["seconds"]) == {"hf_greedy", "exitwise_greedy", "self_speculative"}
    for row in report["prompts"]:  # every method answered, HF greedy is the reference
        assert row["hf_greedy"]["text"] == row["self_speculative"]["text"]
        assert row["exitwise_greedy"]["text"] == row["hf_greedy"]["text"]
    from exitwise.machine import cpu_model

    assert report["machine"]["cpu"] == cpu_model() and cpu_model() in lines[-1]
    saved = json.loads((out / "demo_report.json").read_text())
    assert saved["all_identical"] and saved["exit_layer"] == 2
    lines.clear()
    run_llm_demo(**kw)
    assert any("skipping tuning" in line for line in lines)
    from exitwise.errors import ConfigError

    with pytest.raises(ConfigError, match="tuned at"):  # the folder's exit is at 2, not 3
        run_llm_demo(**{**kw, "exit_layer": 3})


def test_bench_configs_parse_with_an_optional_draft_threshold():
    from exitwise.errors import ConfigError
    from exitwise.recipes.lm_bench import parse_configs

    assert parse_configs(["6:4", "6:6:0.5", (8, 2)]) == [(6, 4, None), (6, 6, 0.5), (8, 2, None)]
    for bad in ("6", "6:4:0.5:1", "a:4"):
        with pytest.raises(ConfigError, match="EXIT:DRAFT_LEN"):
            parse_configs([bad])


def test_tune_lm_on_greedy_answers(tiny_lm_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "sst2" / "train.tsv").write_text(
        "label\tsentence\n" + "".join(f"1\tthe big red cat sat on a mat number {i}\n"
                                      for i in range(80))
    )
    out = tmp_path / "tuned"
    args = ["tune-lm", "--model", str(tiny_lm_dir), "--exit-layer", "2", "--objective", "answers",
            "--answers", "60",
            "--epochs", "8", "--answer-tokens", "10", "--lr", "3e-3", "--batch-size", "8",
            "--data-dir", str(data), "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "tuning_report.json").read_text())
    assert report["objective"] == "answers" and report["config"]["epochs"] == 8
    assert report["after"]["2"] > report["before"]["2"]
    cache = out / "greedy_answers.json"
    assert len(json.loads(cache.read_text())["items"]) == 60
    stamp = cache.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # a rerun reuses the answers and the finished checkpoint
    assert cache.stat().st_mtime_ns == stamp
    assert json.loads((out / "tuning_report.json").read_text())["steps"] == report["steps"]
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "what is the sky", "--max-new-tokens", "6",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_tune_lm_refuses_an_option_its_objective_does_not_have(tmp_path, capsys):
    """--epochs belongs to 'answers': with 'ce' it is refused before any model is loaded."""
    args = ["tune-lm", "--model", str(tmp_path / "absent"), "--objective", "ce", "--epochs", "3",
            "--out", str(tmp_path / "out")]
    assert main(args) != 0
    assert "has no option epochs" in capsys.readouterr().err
    args = ["tune-lm", "--model", str(tmp_path / "absent"), "--objective", "layerskip",
            "--option", "p_max=2", "--out", str(tmp_path / "out")]
    assert main(args) != 0
    assert "p_max" in capsys.readouterr().err


def test_kernels_command_measures_keeps_and_is_used_by_generate(tiny_lm_dir, capsys):
    """`exitwise kernels` measures every weight shape at the asked row counts and keeps the
    choices; `generate --kernels` takes each setting and reports it."""
    import os

    from exitwise.backbones.kernels import default_tuner

    assert main(["kernels", str(tiny_lm_dir), "--rows", "1,3", "--threads", "1",
                 "--again"]) == 0
    printed = capsys.readouterr().out
    kept = default_tuner().decisions()
    # q/o (32x32), k/v (16x32), gate/up (64x32), down (32x64), LM head (64x32 shares a shape
    # with gate/up): 4 shapes x 2 row counts
    assert {k.rsplit(":", 1)[1] for k in kept} >= {"r1", "r3"}
    assert "float32:32x64:n4:r3" in kept and "float32:32x64:n4:r3" in printed
    assert str(default_tuner().path).startswith(os.environ["EXITWISE_CACHE"])
    for kernels in ("stock", "streaming", "auto"):
        assert main(["generate", str(tiny_lm_dir), "--prompt", "hi", "--strategy", "greedy",
                     "--max-new-tokens", "4", "--kernels", kernels, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["stats"]["kernels"] == kernels
        streamed = out["stats"]["streamed_products"] > 0
        if kernels == "auto":  # streams only where a kept measurement said so
            assert streamed <= any(d.stream for d in default_tuner().decisions().values())
        else:
            assert streamed == (kernels == "streaming")

"""The decoder-LM CLI story (tune-lm -> generate) on a tiny random Llama saved like a hub
checkpoint with a word-level tokenizer and a chat template (the ``tiny_lm_dir`` fixture of
conftest.py; no SmolLM2, no network)."""

from __future__ import annotations

import json

import pytest
import torch

from exitwise.cli import main


def test_tune_then_generate(tiny_lm_dir, tmp_path, capsys):
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
    # the continuations' options recorded are those used (not the objective's own defaults)
    assert report["config"]["gen_tokens"] == 16 and report["config"]["num_generations"] == 1
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
    # token trees sized by the exit's confidence, from the command line: greedy's text too
    assert main(["generate", str(out), *prompts, "--strategy", "self_speculative",
                 "--tree-width", "confidence", "--max-new-tokens", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == runs["greedy"]["texts"]

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


def test_bad_lm_arguments_fail_clearly(tiny_lm_dir, tmp_path, capsys):
    # a plain model with no tuned exit and no shipped drafter: self-speculative needs one
    assert main(["generate", str(tiny_lm_dir), "--prompt", "hi", "--no-chat"]) == 2
    assert "exit_layer is required" in capsys.readouterr().err
    assert main(["generate", str(tiny_lm_dir), "--prompt", "hi", "--exit-layer", "9"]) == 2
    assert "exit_layer" in capsys.readouterr().err
    assert main(["tune-lm", "--model", str(tiny_lm_dir), "--exit-layer", "7", "--steps", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_tune_on_answers_to_a_prompts_file(tiny_lm_dir, tmp_path, capsys):
    prompts = ["what is the sky", "a poem on the sea", "tell me a story", "hi there", "the sea"]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(prompts))
    lines = tmp_path / "prompts.txt"
    lines.write_text("\n".join(prompts[:3]) + "\n\n")
    out = tmp_path / "tuned"
    args = ["tune-lm", "--model", str(tiny_lm_dir), "--exit-layer", "2", "--objective",
            "answers", "--answers", "4", "--answer-tokens", "6", "--epochs", "1",
            "--batch-size", "2", "--answer-batch-size", "3", "--device", "cpu",
            "--prompts-file", str(listed), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    cached = json.loads((out / "greedy_answers.json").read_text())["items"]
    # the first --answers of the file's prompts were answered, in order (batches of 3 + 1)
    assert len(cached) == 4
    from exitwise.recipes.lm import TuneLMJob

    job = TuneLMJob(out_dir=str(out), prompts_file=str(lines))
    assert job.read_prompts() == prompts[:3]  # one per line, blank lines skipped
    # fewer prompts than --answers: all of them, and it says so
    assert main([*args[:-4], "--prompts-file", str(lines), "--out", str(tmp_path / "3")]) == 0
    said = capsys.readouterr()
    assert "holds 3 prompts: answering those 3, not 4" in said.out + said.err
    for bad, message in ((tmp_path / "missing.txt", "does not exist"),
                         (tmp_path / "bad.json", "JSON list of strings")):
        if bad.suffix == ".json":
            bad.write_text(json.dumps({"a": 1}))
        assert main([*args[:-4], "--prompts-file", str(bad), "--out", str(tmp_path / "y")]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("gpu", "like 'cpu'"), ("meta", "CPU or a CUDA"),
                                             ("cuda:0", "no CUDA GPU")])
def test_a_bad_or_missing_device_is_a_clear_error(tiny_lm_dir, tmp_path, capsys, device,
                                                  message):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["tune-lm", "--model", str(tiny_lm_dir), "--exit-layer", "2", "--steps", "1",
                 "--device", device, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


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


def test_llm_demo_drafts_with_the_shipped_exit(tiny_lm_dir, tmp_path, monkeypatch):
    """A drafter shipped for the model's weights: the demo uses it (no tuning) with its
    options, every answer identical to HF greedy; --tune would tune anew."""
    import exitwise as ew
    import exitwise.generation.shipped as shipped
    from exitwise.recipes.lm import load_lm
    from exitwise.recipes.lm_demo import run_llm_demo

    lm, _ = load_lm(str(tiny_lm_dir))
    multi = ew.attach_exits(lm, ew.ExitConfig(
        layers=[1], head="lm", num_labels=int(lm.config.vocab_size),
        head_kwargs={"adapter": "mlp", "conditioned": True, "draft_vocab": 24},
        final_head_kwargs={}))
    folder = tmp_path / "drafters" / "tiny"
    multi.save_pretrained(folder)
    (folder / "drafter.json").write_text(json.dumps({
        "fingerprint": shipped.fingerprint(multi.backbone), "exit_layer": 1,
        "options": {"draft_len": "auto", "ngram": 3}, "source": {"command": "test"}}))
    monkeypatch.setattr(shipped, "ASSETS", tmp_path / "drafters")
    lines: list[str] = []
    report = run_llm_demo(out_dir=str(tmp_path / "demo"), model=str(tiny_lm_dir),
                          prompts=["what is the sky"], max_new_tokens=8,
                          print_fn=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("shipped" in line for line in lines)
    assert not any("tuning an exit" in line for line in lines)
    assert report["drafter"] == "shipped" and report["exit_layer"] == 1
    assert report["options"] == {"draft_len": "auto", "ngram": 3}
    assert report["draft_vocab"] == 24  # the shipped exit's own
    assert report["all_identical"]
    # an exit an earlier --tune left in the folder is --tune's: a plain run still drafts
    # with the shipped exit (it used the tuned one instead)
    demo = dict(out_dir=str(tmp_path / "demo"), model=str(tiny_lm_dir),
                prompts=["what is the sky"], max_new_tokens=8, print_fn=lambda *a: None)
    tuned = run_llm_demo(tune=True, exit_layer=1, answers=8, epochs=1, draft_vocab=24, **demo)
    assert tuned["drafter"] != "shipped"
    assert run_llm_demo(**demo)["drafter"] == "shipped"


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


def test_generate_offers_every_registered_decoding_strategy():
    from exitwise.cli_lm import GENERATE_STRATEGIES
    from exitwise.generation.strategies import DECODING_STRATEGIES

    assert sorted(GENERATE_STRATEGIES) == sorted(DECODING_STRATEGIES.names())


def test_training_free_strategies_from_the_command_line(tiny_lm_dir, capsys):
    """anpd, layer_skip (--skip) and swift on a plain model with no exit: greedy's text."""
    prompts = ["--prompt", "what is the sky", "--prompt", "a poem on the sea"]
    common = [str(tiny_lm_dir), *prompts, "--max-new-tokens", "12", "--json"]
    assert main(["generate", *common, "--strategy", "greedy"]) == 0
    greedy = json.loads(capsys.readouterr().out)["texts"]
    runs = {
        "anpd": ["--ngram", "3", "--draft-len", "2"],
        "layer_skip": ["--skip", "1,2:mlp", "--draft-threshold", "auto"],
        "swift": ["--tree-width", "2"],
    }
    for strategy, extra in runs.items():
        assert main(["generate", *common, "--strategy", strategy, *extra]) == 0, strategy
        out = json.loads(capsys.readouterr().out)
        assert out["stats"]["strategy"] == strategy
        assert out["texts"] == greedy, strategy
    # layer_skip without --skip says what it needs; a malformed --skip is refused by the parser
    assert main(["generate", *common, "--strategy", "layer_skip"]) == 2
    assert "--skip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", *common, "--strategy", "layer_skip", "--skip", "2:ffn"])
    assert "block:attn" in capsys.readouterr().err
    # an option of another strategy is refused, naming it
    assert main(["generate", *common, "--strategy", "swift", "--ngram", "3"]) == 2
    assert "ngram" in capsys.readouterr().err
    # a token policy without a threshold (it was given one, and failed on the keyword)
    assert main(["generate", *common, "--strategy", "early_exit", "--policy", "never"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == greedy
    assert main(["generate", *common, "--strategy", "early_exit", "--policy", "never",
                 "--threshold", "0.5"]) == 2
    assert "--policy never has no threshold" in capsys.readouterr().err


def test_a_tuned_decoder_is_what_generate_runs_and_the_base_path_is_kept_absolute(
        tiny_lm_dir, tmp_path, capsys, monkeypatch):
    # layerskip tunes the decoder itself: the folder's saved decoder, not the base model, is
    # what `generate FOLDER` must run; a relative --model is recorded absolute, so the folder
    # loads from anywhere; the same command and --seed give the same exits
    import shutil

    from safetensors.torch import load_file

    from exitwise.recipes.lm import RECIPE_NAME, load_lm

    shutil.copytree(tiny_lm_dir, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    runs = []
    for name in ("a", "b"):
        args = ["tune-lm", "--model", "base", "--objective", "layerskip", "--exit-layer", "2",
                "--steps", "6", "--lr", "5e-2", "--batch-size", "4", "--seq-len", "16",
                "--generations", "1", "--gen-tokens", "8", "--seed", "3", "--out", name]
        assert main(args) == 0
        runs.append(tmp_path / name)
    capsys.readouterr()
    first, second = (load_file(str(r / "exit_heads.safetensors")) for r in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    recipe = json.loads((runs[0] / RECIPE_NAME).read_text())
    assert recipe["base_model"] == str((tmp_path / "base").resolve())
    assert json.loads((runs[0] / "exit_config.json").read_text())["backbone_saved"]
    tuned, _ = load_lm(str(runs[0]))
    base, _ = load_lm(str(tmp_path / "base"))
    lm = tuned.backbone.model
    saved = type(lm).from_pretrained(str(runs[0] / "backbone"))
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(),
                                                 saved.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(lm.state_dict().values(),
                                                     base.state_dict().values()))


def test_generate_uses_the_calm_classifier_tune_lm_saved(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "calm"
    assert main(["tune-lm", "--model", str(tiny_lm_dir), "--objective", "calm",
                 "--exit-layer", "2", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                 "--generations", "1", "--gen-tokens", "16", "--out", str(out)]) == 0
    assert (out / "calm_classifier.json").is_file()
    capsys.readouterr()
    base = ["generate", str(out), "--prompt", "what is the sky", "--max-new-tokens", "8",
            "--json"]
    assert main([*base, "--strategy", "greedy"]) == 0
    greedy = json.loads(capsys.readouterr().out)["texts"]
    for extra in ([], ["--classifier", str(out)]):  # the folder's own, found or named
        # a probability never reaches 1.0: no token exits, so greedy's text
        assert main([*base, "--strategy", "early_exit", "--policy", "calm_learned",
                     "--threshold", "1.0", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["texts"] == greedy
    # every token exits at the exit when the threshold is 0
    assert main([*base, "--strategy", "early_exit", "--policy", "calm_learned",
                 "--threshold", "0.0"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["layer_applications_per_token"] < 4
    # --classifier is calm_learned's: implied alone, refused beside another policy
    assert main([*base, "--strategy", "early_exit", "--threshold", "1.0",
                 "--classifier", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == greedy
    assert main([*base, "--strategy", "early_exit", "--policy", "calm_softmax",
                 "--classifier", str(out)]) == 2
    assert "--classifier is the calm_learned policy's" in capsys.readouterr().err
    # another folder without a classifier still says what is missing
    assert main(["generate", str(tiny_lm_dir), "--prompt", "hi", "--strategy", "early_exit",
                 "--policy", "calm_learned", "--max-new-tokens", "2"]) != 0
    assert "needs its trained classifier" in capsys.readouterr().err


def test_more_answers_into_the_same_folder_reuse_the_answers_it_has(
        tiny_lm_dir, tmp_path, capsys, monkeypatch):
    import exitwise.lm.answers as answers_module

    answered: list[int] = []
    real = answers_module.generate

    def counting(backbone, ids, *a, **k):
        answered.append(int(ids.shape[0]))
        return real(backbone, ids, *a, **k)

    monkeypatch.setattr(answers_module, "generate", counting)
    out = tmp_path / "grow"
    args = ["tune-lm", "--model", str(tiny_lm_dir), "--exit-layer", "2", "--objective",
            "answers", "--answer-tokens", "6", "--epochs", "1", "--batch-size", "2",
            "--answer-batch-size", "3", "--out", str(out)]
    assert main([*args, "--answers", "4"]) == 0
    first = json.loads((out / "greedy_answers.json").read_text())["items"]
    assert sum(answered) == 4
    capsys.readouterr()
    answered.clear()
    # resuming with more answers is refused (other data), naming the command-line way out
    assert main([*args, "--answers", "6"]) == 2
    assert "--no-resume" in capsys.readouterr().err
    assert main([*args, "--answers", "6", "--no-resume"]) == 0
    grown = json.loads((out / "greedy_answers.json").read_text())["items"]
    assert len(grown) == 6 and grown[:4] == first
    assert sum(answered) == 2  # over both runs, only the two new prompts were answered
    report = json.loads((out / "tuning_report.json").read_text())
    assert report["num_train"] + report["num_eval"] == 6  # tuned anew on all six


def test_sampling_options_from_the_command_line(tiny_lm_dir, capsys):
    """--temperature / --top-k / --top-p / --seed reach the sampler with --sample and are
    refused without it (greedy would ignore them silently)."""
    common = [str(tiny_lm_dir), "--prompt", "what is the sky", "--max-new-tokens", "8",
              "--json", "--strategy", "greedy"]
    assert main(["generate", *common]) == 0
    greedy = json.loads(capsys.readouterr().out)["texts"]
    # top-k 1 keeps only the argmax: sampling then gives greedy's text whatever the seed
    for seed in ("1", "2"):
        assert main(["generate", *common, "--sample", "--top-k", "1", "--temperature", "0.7",
                     "--top-p", "0.9", "--seed", seed]) == 0
        assert json.loads(capsys.readouterr().out)["texts"] == greedy
    # the values reach the sampler: an invalid one is its error, not ignored
    assert main(["generate", *common, "--sample", "--temperature", "0"]) == 2
    assert "temperature must be" in capsys.readouterr().err
    assert main(["generate", *common, "--sample", "--top-p", "1.5"]) == 2
    assert "top_p must be" in capsys.readouterr().err
    for flags in (["--temperature", "0.7"], ["--top-k", "5", "--seed", "3"], ["--seed", "3"]):
        assert main(["generate", *common, *flags]) == 2
        err = capsys.readouterr().err
        assert "only apply with --sample" in err and flags[0] in err


def test_a_folder_keeps_one_objectives_exits_and_a_checkpoint_its_steps(tiny_lm_dir, tmp_path,
                                                                        capsys):
    """A second objective tuned into the same folder replaced the tuned exits with fresh ones
    (silently); fewer --steps than the checkpoint returned the longer run; objectives that
    train no exit head took --draft-vocab (its first ids) and attention adapters (random)."""
    out = tmp_path / "tuned"
    common = ["--model", str(tiny_lm_dir), "--exit-layer", "2", "--batch-size", "4",
              "--seq-len", "32", "--gen-tokens", "8", "--generations", "1", "--out", str(out)]
    assert main(["tune-lm", *common, "--objective", "kl", "--steps", "4"]) == 0
    tuned = (out / "exit_heads.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["tune-lm", *common, "--objective", "ce", "--steps", "4"]) == 2
    assert "holds exits tuned with the 'kl' objective" in capsys.readouterr().err
    assert (out / "exit_heads.safetensors").read_bytes() == tuned  # untouched
    assert main(["tune-lm", *common, "--objective", "kl", "--steps", "2"]) == 2
    assert "past the 2 steps" in capsys.readouterr().err
    assert main(["tune-lm", *common, "--objective", "ce", "--steps", "2", "--no-resume"]) == 0
    assert json.loads((out / "tuning_report.json").read_text())["objective"] == "ce"
    capsys.readouterr()
    # exits of another shape into the same folder: refused by name (a key-mismatch error
    # from the checkpoint before), and --no-resume starts over with them
    tuned = (out / "exit_heads.safetensors").read_bytes()
    for extra, said in ((["--adapter", "norm"], "adapter='mlp' there, 'norm' now"),
                        (["--draft-vocab", "16"], "draft_vocab=None there, 16 now")):
        assert main(["tune-lm", *common, "--objective", "ce", "--steps", "2", *extra]) == 2
        assert said in capsys.readouterr().err
    assert (out / "exit_heads.safetensors").read_bytes() == tuned  # untouched
    assert main(["tune-lm", *common, "--objective", "ce", "--steps", "2", "--adapter", "norm",
                 "--no-resume"]) == 0
    assert json.loads((out / "lm_recipe.json").read_text())["job"]["adapter"] == "norm"
    capsys.readouterr()
    # a run the tuning itself refuses (another model's weights) leaves the folder's recipe: it
    # names the base model its exits load over
    import shutil

    from transformers import LlamaForCausalLM

    other = tmp_path / "other-llama"
    shutil.copytree(tiny_lm_dir, other)
    lm = LlamaForCausalLM.from_pretrained(other)
    with torch.no_grad():
        lm.lm_head.weight.add_(0.01)
    lm.save_pretrained(other)
    recipe = (out / "lm_recipe.json").read_text()
    moved = [other if a == str(tiny_lm_dir) else a for a in common]
    assert main(["tune-lm", *map(str, moved), "--objective", "ce", "--steps", "2",
                 "--adapter", "norm"]) == 2
    assert "weights differ" in capsys.readouterr().err
    assert (out / "lm_recipe.json").read_text() == recipe
    # the job's own continuation settings as options were overridden and recorded anyway
    assert main(["tune-lm", *common[:-1], str(tmp_path / "o"), "--objective", "kl",
                 "--steps", "1", "--option", "gen_tokens=4"]) == 2
    assert "give --gen-tokens" in capsys.readouterr().err
    for extra in (["--draft-vocab", "8"], ["--adapter", "kangaroo"]):
        assert main(["tune-lm", *common[:-1], str(tmp_path / "ls"), "--objective", "layerskip",
                     "--steps", "1", *extra]) == 2
        assert "does not train the exit heads" in capsys.readouterr().err

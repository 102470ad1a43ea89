"""The CLI story end to end on a tiny local model and a tiny TSV dataset (no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from exitwise.cli import main

WORDS = ["good", "great", "fun", "bad", "awful", "dull", "the", "film", "a", "is", "very", "plot"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 3-layer random BERT + a word-level tokenizer saved like a hub checkpoint."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory) -> Path:
    """Sentiment-like TSVs: label 1 iff a positive word occurs (learnable in a few steps)."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for split, n in (("train", 240), ("dev", 60)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            cue = rng.choice(WORDS[:3] if label else WORDS[3:6])
            words = [rng.choice(WORDS[6:]) for _ in range(rng.randint(2, 8))]
            words.insert(rng.randint(0, len(words)), cue)
            lines.append(f"{' '.join(words)}\t{label}")
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return d


def test_train_calibrate_evaluate_bench(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["train", "--out", str(out), "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
            "--max-steps", "12", "--batch-size", "16", "--lr", "5e-3", "--holdout", "60"]
    assert main(args) == 0
    assert (out / "exit_config.json").is_file() and (out / "exit_heads.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))

    assert main(["calibrate", str(out), "--max-drop", "1.0", "--policies", "entropy,patience",
                 "--delta", "none"]) == 0
    calib = json.loads((out / "exit_config.json").read_text())["calibration"]
    assert set(calib["policies"]) == {"entropy@drop1", "patience@drop1"}

    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "dev", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 60 and len(report["per_exit_accuracy"]) == 3
    assert (out / "eval-dev" / "curves.png").stat().st_size > 0
    # the replayed policies and the per-exit numbers agree in what they describe
    for entry in report["policies"].values():
        # a setting that keeps every row to full depth also pays for the exit heads
        assert 1.0 <= entry["mean_layers"] <= 3.0 and entry["flops_speedup"] > 0.9

    assert main(["bench", str(out), "--batch-sizes", "1,8", "--repeats", "1", "--limit", "16",
                 "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    for bs in ("1", "8"):
        for entry in bench["batch_sizes"][bs]["policies"].values():
            assert entry["speedup"] > 0 and 0.0 <= entry["accuracy"] <= 1.0


def test_reruns_resume_only_the_same_job_and_are_reproducible(
        tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    # the same command twice gives the same model (--seed seeds the fresh heads too); a
    # rerun into the folder with other data or options is refused (it once reused the old
    # run and recorded the new options), --no-resume starts over; a relative --data is
    # recorded absolute, so later commands run from any directory
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_data_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(tiny_model_dir), "--data", "data", "--max-steps", "4",
              "--batch-size", "16", "--lr", "5e-3", "--holdout", "60"]
    for out in ("a", "b"):
        assert main(["train", "--out", out, *common]) == 0
    a, b = (load_file(f"{out}/exit_heads.safetensors") for out in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    job = json.loads((tmp_path / "a" / "exitwise_job.json").read_text())
    assert job["data"] == str((tmp_path / "data").resolve())
    assert main(["train", "--out", "a", *common]) == 0  # the same job: resumes (done)
    capsys.readouterr()
    other = [*common[:4], "--max-steps", "6", *common[6:]]
    assert main(["train", "--out", "a", *other]) == 2
    assert "max_steps: 4 -> 6" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "exitwise_job.json").read_text())["max_steps"] == 4
    assert main(["train", "--out", "a", *other, "--no-resume"]) == 0
    assert json.loads((tmp_path / "a" / "exitwise_job.json").read_text())["max_steps"] == 6
    monkeypatch.chdir(tmp_path.parent)
    assert main(["calibrate", str(tmp_path / "a"), "--max-drop", "5", "--policies", "entropy",
                 "--delta", "none"]) == 0
    # a later run under other temperatures removes, and names, the entries searched under the
    # old ones (they stayed, default included, running on thresholds chosen for other scores)
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "a"), "--max-drop", "5", "--policies", "confidence",
                 "--delta", "none", "--no-temperature"]) == 0
    assert ("removed entropy@drop5: calibrated under other temperatures"
            in capsys.readouterr().out)
    calib = json.loads((tmp_path / "a" / "exit_config.json").read_text())["calibration"]
    assert list(calib["policies"]) == ["confidence@drop5"]
    assert calib["default"] == "confidence@drop5"


def test_evaluating_on_the_training_rows_is_refused(tiny_model_dir, tiny_data_dir, tmp_path,
                                                   capsys):
    # a single file serves every split, and "validation" reads dev.tsv: both were once scored
    # as if they were unseen rows
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(tiny_data_dir / "train.tsv"), "--max-steps", "2", "--holdout", "60"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    assert "the rows of" in capsys.readouterr().err
    out = tmp_path / "v"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(tiny_data_dir) + "/", "--split", "validation", "--max-steps", "2",
                 "--holdout", "30"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(tiny_data_dir)]) == 2
    assert "dev.tsv" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "m"), "--model", str(tiny_model_dir),
                 "--data", str(tmp_path / "nowhere.tsv"), "--max-steps", "1"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_commands_refuse_a_folder_no_exitwise_train_made(tmp_path, capsys):
    # a model saved with save_pretrained (an image model, say): calibrate crashed on a
    # missing exitwise_job.json and evaluate / bench asked for a backbone= the CLI lacks
    from torch import nn

    import exitwise as ew

    blocks = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())]
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 3, 6, 6)),
                            ew.ExitConfig(layers="all", head="mean", num_labels=2))
    model.save_pretrained(tmp_path / "saved")
    for argv, what in ((["calibrate", "saved"], "saved by save_pretrained"),
                       (["evaluate", "saved"], "saved by save_pretrained"),
                       (["bench", "saved"], "saved by save_pretrained"),
                       (["evaluate", "none"], "no exitwise run")):
        assert main([argv[0], str(tmp_path / argv[1])]) == 2, argv
        err = capsys.readouterr().err
        assert "not a run of `exitwise train`" in err and "Python API" in err, argv
        assert what in err, argv


def test_malformed_data_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\ngood film\tpositive\textra\n")
    code = main(["train", "--out", str(tmp_path / "m"), "--model", str(tiny_model_dir),
                 "--data", str(d), "--max-steps", "1"])
    assert code == 2
    assert "train.tsv:2" in capsys.readouterr().err


def test_strategy_options_reach_the_strategy_and_cats_calibrates_by_conformal(
        tiny_model_dir, tiny_data_dir, tmp_path):
    from exitwise.recipes import text_classification as tc

    out = tmp_path / "cats"
    job = tc.TrainJob(out_dir=str(out), model=str(tiny_model_dir), data=str(tiny_data_dir),
                      strategy="cats", max_steps=6, batch_size=16, learning_rate=5e-3,
                      holdout=60, strategy_options={"hidden": 8})
    model = tc.run_train(job, progress=False)
    assert model.scorer is not None and model.scorer.hidden == 8  # the option arrived
    assert tc.load_job(out).strategy_options == {"hidden": 8}
    report = tc.run_calibrate(out, policies=("cats",), max_drop_points=20, delta=None,
                              progress=False)
    entry = report["policies"]["cats@drop20"]
    assert entry["target"]["kind"] == "consistency" and entry["target"]["epsilon"] == 0.2
    assert 0.0 <= entry["heldout"]["consistency"] <= 1.0


@pytest.mark.parametrize("argv", [
    ["train", "--out", "x", "--batch-size", "0"], ["train", "--out", "x", "--lr", "-1"],
    ["train", "--out", "x", "--epochs", "0"], ["bench", "x", "--repeats", "0"],
    ["bench", "x", "--batch-sizes", "4,x"], ["bench", "x", "--batch-sizes", "0,4"],
])
def test_bad_numbers_are_usage_errors_not_tracebacks(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and "expected" in capsys.readouterr().err


def test_calibration_keys_per_risk_early_policy_checks_and_notes(tiny_model_dir, tiny_data_dir,
                                                                 tmp_path, capsys):
    import warnings

    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(tiny_data_dir), "--max-steps", "2", "--holdout", "60"]) == 0
    for risk in ("drop", "disagreement"):
        assert main(["calibrate", str(out), "--max-drop", "5", "--policies", "entropy",
                     "--delta", "none", "--risk", risk]) == 0
    calib = json.loads((out / "exit_config.json").read_text())["calibration"]["policies"]
    assert {"entropy@drop5", "entropy@disagree5"} <= set(calib)  # neither overwrote the other
    capsys.readouterr()
    # a policy reading a learned exit score the model does not have: refused up front
    assert main(["calibrate", str(out), "--policies", "lte", "--delta", "none"]) == 2
    assert "exit scorer" in capsys.readouterr().err
    # a budget no setting meets: a note in the report, not a Python warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["calibrate", str(out), "--budget", "0.01", "--policies", "entropy"]) == 0
    assert "note: entropy@budget0.01" in capsys.readouterr().out


def test_starting_over_and_calibrating_leave_no_stale_or_torn_model(
        tiny_model_dir, tiny_data_dir, tmp_path, capsys, monkeypatch):
    import exitwise.recipes.text_classification as tc

    out = tmp_path / "m"
    common = ["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--max-steps", "2",
              "--batch-size", "16", "--holdout", "60"]
    assert main(["train", "--out", str(out), *common]) == 0
    # the same folder spelt another way is the same job (it was refused as other settings)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "m", *common]) == 0
    # calibrate rewrites the heads and the config only: the fine-tuned backbone, rewritten
    # in place before, could be torn by a kill
    backbone = next((out / "backbone").glob("*.safetensors"))
    stamp = backbone.stat().st_mtime_ns
    assert main(["calibrate", str(out), "--max-drop", "5", "--policies", "entropy",
                 "--delta", "none"]) == 0
    assert backbone.stat().st_mtime_ns == stamp
    # --no-resume cut short: the old model no longer stands beside the new job's settings
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tc, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        tc.run_train(tc.TrainJob(out_dir=str(out), model=str(tiny_model_dir),
                                 data=str(tiny_data_dir), max_steps=2, batch_size=16,
                                 holdout=60, seed=1), resume=False, print_fn=lambda *a: None)
    capsys.readouterr()
    assert main(["calibrate", str(out), "--policies", "entropy", "--delta", "none"]) != 0
    assert "not an exitwise model directory" in capsys.readouterr().err


def test_an_edited_data_file_or_another_model_spelling(tiny_model_dir, tiny_data_dir, tmp_path,
                                                       capsys, monkeypatch):
    # the same command after editing the data file silently reused the old model; the same
    # --model spelt another way was refused as other settings
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    shutil.copytree(tiny_model_dir, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    common = ["--data", "data", "--max-steps", "2", "--batch-size", "16", "--holdout", "60"]
    assert main(["train", "--out", "m", "--model", "ckpt", *common]) == 0
    assert main(["train", "--out", "m", "--model", str(tmp_path / "ckpt") + "/",
                 *common]) == 0
    lines = (data / "train.tsv").read_text().splitlines()
    flipped = [lines[0]] + [f"{t}\t{1 - int(y)}" for t, y in
                            (row.rsplit("\t", 1) for row in lines[1:])]
    (data / "train.tsv").write_text("\n".join(flipped) + "\n")
    capsys.readouterr()
    assert main(["train", "--out", "m", "--model", "ckpt", *common]) == 2
    assert "the data's rows changed" in capsys.readouterr().err


def _copy_data(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_text(f.read_text())
    return dst


def test_calibrate_refuses_held_out_rows_that_changed_since_training(
        tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """A training file shuffled and grown after training: its held-out slice would be rows
    the model trained on, and the certificate would not hold (it was calibrated silently)."""
    data = _copy_data(tiny_data_dir, tmp_path / "data")
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(data), "--max-steps", "2", "--batch-size", "16", "--holdout", "60"]) == 0
    assert json.loads((out / "exitwise_job.json").read_text())["holdout_digest"]
    assert main(["calibrate", str(out), "--delta", "none"]) == 0  # unchanged: fine
    # the Python API's holdout: a part of the kept-out rows works, more rows are refused
    from exitwise.errors import ConfigError
    from exitwise.recipes.text_classification import run_calibrate

    report = run_calibrate(out, policies=("entropy",), delta=None, holdout=40, progress=False)
    assert report["heldout_rows"] == 40
    with pytest.raises(ConfigError, match="kept only 60 out"):
        run_calibrate(out, policies=("entropy",), delta=None, holdout=80, progress=False)
    capsys.readouterr()
    lines = (data / "train.tsv").read_text().splitlines()
    body = lines[1:]
    random.Random(1).shuffle(body)
    (data / "train.tsv").write_text("\n".join([lines[0], *body, *body[:30]]) + "\n")
    assert main(["calibrate", str(out), "--delta", "none"]) == 2
    assert "changed since" in capsys.readouterr().err
    # the same data named with --data (spelt otherwise) is the training data: refused too
    assert main(["calibrate", str(out), "--delta", "none", "--data", f"{data}/../data/"]) == 2
    assert "changed since" in capsys.readouterr().err


def test_train_says_how_many_rows_were_cut_and_refuses_one_class(
        tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    long = tmp_path / "long"
    long.mkdir()
    rows = ["sentence\tlabel"] + [f"{' '.join(['the film'] * 20)} {w}\t{i % 2}"
                                  for i, w in enumerate(["good", "bad"] * 20)]
    (long / "train.tsv").write_text("\n".join(rows + ["good film\t1"]) + "\n")
    assert main(["train", "--out", str(tmp_path / "l"), "--model", str(tiny_model_dir),
                 "--data", str(long), "--max-steps", "1", "--holdout", "10",
                 "--max-length", "16"]) == 0
    assert "40 of 41 rows are longer than 16 tokens and were cut" in capsys.readouterr().out
    one = tmp_path / "one"
    one.mkdir()
    (one / "train.tsv").write_text("sentence\tlabel\n" + "good film\tyes\n" * 40)
    assert main(["train", "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                 "--data", str(one), "--max-steps", "1"]) == 2
    assert "only one class" in capsys.readouterr().err


def test_no_resume_with_a_refused_strategy_keeps_the_model(tiny_model_dir, tiny_data_dir,
                                                           tmp_path, capsys):
    out = tmp_path / "m"
    common = ["--out", str(out), "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
              "--max-steps", "1", "--holdout", "60"]
    assert main(["train", *common]) == 0
    saved = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    capsys.readouterr()
    assert main(["train", *common, "--no-resume", "--strategy", "jiont"]) == 2
    assert "jiont" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == saved
    # a policy with its own fitting method is refused by calibrate, not run at full depth
    assert main(["calibrate", str(out), "--policies", "e2cm"]) == 2
    assert "fit_e2cm_policy" in capsys.readouterr().err


def test_reports_on_other_data_do_not_overwrite_the_own_dev_report(
        tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(tiny_data_dir), "--max-steps", "1", "--holdout", "60"]) == 0
    assert main(["calibrate", str(out), "--delta", "none", "--policies", "entropy"]) == 0
    other = _copy_data(tiny_data_dir, tmp_path / "reviews")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bench runs at its --threads 2 and gives 1 back
    for data in ([], ["--data", str(other)]):
        assert main(["evaluate", str(out), "--limit", "8", *data]) == 0
        assert main(["bench", str(out), "--batch-sizes", "1", "--repeats", "1", "--limit", "4",
                     *data]) == 0
    assert (out / "eval-dev" / "report.json").is_file()
    assert (out / "eval-reviews-dev" / "report.json").is_file()
    assert (out / "bench-dev.json").is_file() and (out / "bench-reviews-dev.json").is_file()
    assert torch.get_num_threads() == 1  # bench --threads is for its run only
    torch.set_num_threads(threads)
    # the training data named again is the same data: the same report
    assert main(["evaluate", str(out), "--limit", "8", "--data", str(tiny_data_dir)]) == 0
    assert not list(out.glob(f"eval-{tiny_data_dir.name}-*"))
    capsys.readouterr()


def test_a_model_trained_on_one_file_is_told_to_evaluate_on_another(tiny_model_dir,
                                                                    tmp_path, capsys):
    single = tmp_path / "all.tsv"
    single.write_text("sentence\tlabel\n" + "".join(
        f"{'good' if i % 2 else 'bad'} film\t{i % 2}\n" for i in range(40)))
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(single), "--max-steps", "1", "--holdout", "10"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "split your file" in err and "--split test" not in err


@pytest.mark.parametrize("strategy, own", [
    ("berxit", "lte"),  # its learning-to-exit scorer's policy: calibrate's defaults left it out
    ("fastbert", "fastbert"),  # the method's own exit rule: only the generic four were tried
])
def test_a_methods_own_policy_is_calibrated_by_default(tiny_model_dir, tiny_data_dir, tmp_path,
                                                       strategy, own):
    out = tmp_path / "m"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(tiny_data_dir), "--max-steps", "2", "--holdout", "60",
                 "--strategy", strategy]) == 0
    assert main(["calibrate", str(out), "--delta", "none"]) == 0
    calib = json.loads((out / "exit_config.json").read_text())["calibration"]
    assert {f"{own}@drop1", "entropy@drop1"} <= set(calib["policies"])


def test_an_interrupt_says_whether_a_rerun_continues(monkeypatch, capsys):
    # bench / evaluate / calibrate write at the end only: they said a rerun would continue
    from exitwise.recipes import text_classification as tc
    from exitwise.recipes import text_evaluate as te

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(te, "run_bench", stop)
    monkeypatch.setattr(tc, "run_train", stop)
    assert main(["bench", "somewhere"]) == 130
    assert "bench saved nothing of this run" in capsys.readouterr().err
    assert main(["train", "--out", "somewhere"]) == 130
    assert "continue from what it last saved" in capsys.readouterr().err
    for argv in (["bench", "m", "--threads", "0"], ["bench", "m", "--limit", "-5"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "expected a number > 0" in capsys.readouterr().err


def test_strategy_options_and_weights_reach_every_strategy(tiny_model_dir, tiny_data_dir,
                                                           tmp_path, capsys):
    # exitwise train had no --option, and --weights reached joint only (ensemble_ic trained
    # with uniform weights while its job recorded depth)
    common = ["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--max-steps", "1",
              "--holdout", "60"]

    def trained_with(out):
        return json.loads((out / "checkpoints" / "exitwise_progress.json").read_text())[
            "strategy"]

    assert main(["train", "--out", str(tmp_path / "e"), *common, "--strategy", "ensemble_ic",
                 "--weights", "depth", "--option", "diversity_weight=0.5"]) == 0
    used = trained_with(tmp_path / "e")
    assert used["weights"] == "depth" and used["diversity_weight"] == 0.5
    assert main(["train", "--out", str(tmp_path / "j"), *common, "--weights", "depth"]) == 0
    assert trained_with(tmp_path / "j")["weights"] == "depth"
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "f"), *common, "--strategy", "fastbert",
                 "--weights", "depth"]) == 2
    assert "weights" in capsys.readouterr().err


def test_a_dact_model_is_calibrated_at_temperature_one(tiny_model_dir, tiny_data_dir, tmp_path):
    # DACT accumulates the exits' distributions as trained; calibrate fitted temperatures
    # (0.79 .. 20 in the review) and the halting then read softmax(z / T)
    out = tmp_path / "dact"
    assert main(["train", "--out", str(out), "--model", str(tiny_model_dir), "--data",
                 str(tiny_data_dir), "--max-steps", "2", "--holdout", "60",
                 "--strategy", "dact"]) == 0
    from exitwise.recipes import text_classification as tc

    report = tc.run_calibrate(out, delta=None, progress=False)
    assert report["temperatures"] == [1.0] * len(report["temperatures"])
    assert any(n.startswith("dact: temperatures left at 1") for n in report["notes"])
    assert "dact@drop1" in report["policies"]

"""Interrupted runs continue from their last checkpoint and end where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.trainkit import (
    FAST,
    CrashAfterSave,
    Interrupt,
    StageRecorder,
    snapshot,
    tiny_model,
    token_items,
)

from exitwise.errors import ConfigError
from exitwise.training import train
from exitwise.checkpoint import PROGRESS_NAME

N = 8  # steps per stage; checkpoints every N // 2
ARGS = {**FAST, "save_strategy": "steps", "save_steps": N // 2, "max_steps": N, "save_final": False}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # Bit-exact: CPU kernels, dropout 0, same seed, and the checkpoint restores the model,
        # optimizer, scheduler, RNG states and data position (seeded sampler, skipped batches),
        # so the resumed run replays exactly the arithmetic of the uninterrupted one.
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("strategy, crash_stage, sampling", [
    ("joint", "stage-1", "random"), ("two_stage", "stage-2", "random"),
    # 3 steps per epoch: the checkpoint at step 4 is mid-epoch, where transformers' own
    # length-grouped sampler reshuffled from the not yet restored global RNG
    ("joint", "stage-1", "group_by_length"),
])
def test_resume_continues_from_checkpoint(strategy, crash_stage, sampling, tmp_path):
    items = token_items(48, seed=1)
    args = {**ARGS, "train_sampling_strategy": sampling}

    reference = tiny_model()
    train(reference, items, strategy=strategy, output_dir=tmp_path / "full", **args)

    model = tiny_model()
    with pytest.raises(Interrupt):
        train(
            model,
            items,
            strategy=strategy,
            output_dir=tmp_path / "cut",
            callbacks=[CrashAfterSave(crash_stage, N // 2)],
            **args,
        )
    progress = (
        json.loads((tmp_path / "cut" / PROGRESS_NAME).read_text())
        if crash_stage != "stage-1"
        else None
    )
    if progress is not None:
        assert progress["completed"] == ["stage-1"]

    fresh = tiny_model()  # a new process would start from a freshly built model
    recorder = StageRecorder()
    result = train(
        fresh,
        items,
        strategy=strategy,
        output_dir=tmp_path / "cut",
        resume=True,
        callbacks=[recorder],
        **args,
    )

    crashed = next(s for s in result.stages if s.name == crash_stage)
    assert crashed.resumed_from is not None and crashed.resumed_from.endswith(
        f"checkpoint-{N // 2}"
    )
    assert recorder.steps[crash_stage] == list(range(N // 2 + 1, N + 1))  # continued, not restarted
    assert crashed.global_step == N
    for s in result.stages:
        if s.name < crash_stage:  # earlier stages were not run again
            assert s.skipped and s.name not in recorder.before
    _assert_same_weights(snapshot(fresh), snapshot(reference))
    assert fresh.backbone_tuned


def test_resume_of_finished_run_only_loads_weights(tmp_path):
    items = token_items(32, seed=2)
    model = tiny_model()
    train(model, items, strategy="two_stage", output_dir=tmp_path, **{**ARGS, "max_steps": 2})
    fresh = tiny_model()
    recorder = StageRecorder()
    result = train(
        fresh,
        items,
        strategy="two_stage",
        output_dir=tmp_path,
        resume=True,
        callbacks=[recorder],
        **{**ARGS, "max_steps": 2},
    )
    assert all(s.skipped for s in result.stages) and not recorder.before
    _assert_same_weights(snapshot(fresh), snapshot(model))


def test_used_output_dir_needs_resume_or_overwrite(tmp_path):
    items = token_items(16, seed=3)
    args = {**ARGS, "max_steps": 1}
    train(tiny_model(), items, strategy="joint", output_dir=tmp_path, **args)
    with pytest.raises(ConfigError, match="resume=True"):
        train(tiny_model(), items, strategy="joint", output_dir=tmp_path, **args)
    with pytest.raises(ConfigError, match="strategy"):
        train(tiny_model(), items, strategy="exits_only", output_dir=tmp_path, resume=True, **args)
    result = train(
        tiny_model(), items, strategy="exits_only", output_dir=tmp_path, overwrite=True, **args
    )
    assert result.stages[0].global_step == 1


def test_checkpoints_are_safetensors_and_reload_exactly(tmp_path):
    from exitwise.training import load_model_weights

    items = token_items(16, seed=4)
    model = tiny_model()
    train(
        model,
        items,
        strategy="joint",
        output_dir=tmp_path,
        **{**ARGS, "max_steps": 2, "save_steps": 1},
    )
    ckpt = tmp_path / "stage-1" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file()
    assert not list(ckpt.glob("*.bin")) and not list(ckpt.glob("pytorch_model*"))
    other = tiny_model(seed=5)
    load_model_weights(other, ckpt / "model.safetensors")
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_with_other_settings_or_data_is_refused(tmp_path):
    # a finished stage was skipped and the new settings ignored, without a word
    items = token_items(16, seed=3)
    args = {**ARGS, "max_steps": 1}
    train(tiny_model(), items, strategy="joint", output_dir=tmp_path, **args)
    with pytest.raises(ConfigError, match=r"learning_rate: 0.002 -> 0.01"):
        train(tiny_model(), items, strategy="joint", output_dir=tmp_path, resume=True,
              **{**args, "learning_rate": 1e-2})
    with pytest.raises(ConfigError, match="train digest"):
        train(tiny_model(), token_items(16, seed=4), strategy="joint", output_dir=tmp_path,
              resume=True, **args)
    # how a run is saved or logged is not a different run
    train(tiny_model(), items, strategy="joint", output_dir=tmp_path, resume=True,
          **{**args, "save_steps": 3, "logging_strategy": "steps"})


def test_a_checkpoint_cut_short_is_passed_over(tmp_path):
    # a kill while the Trainer wrote checkpoint-8 (trainer_state.json comes last) made every
    # rerun fail on the missing file; the last complete checkpoint is used instead
    items = token_items(48, seed=1)
    reference = tiny_model()
    train(reference, items, strategy="joint", output_dir=tmp_path / "full", **ARGS)
    with pytest.raises(Interrupt):
        train(tiny_model(), items, strategy="joint", output_dir=tmp_path / "cut",
              callbacks=[CrashAfterSave("stage-1", N)], **{**ARGS, "save_total_limit": 2})
    stage = tmp_path / "cut" / "stage-1"
    (stage / f"checkpoint-{N}" / "trainer_state.json").unlink()
    fresh = tiny_model()
    result = train(fresh, items, strategy="joint", output_dir=tmp_path / "cut", resume=True,
                   **ARGS)
    assert result.stages[0].resumed_from.endswith(f"checkpoint-{N // 2}")
    _assert_same_weights(snapshot(fresh), snapshot(reference))


def test_an_interrupted_overwrite_leaves_no_stale_marker(tmp_path):
    # the marker of the old run (stage-1 completed) survived the overwrite's deletion of
    # stage-1, and every later resume failed on the missing stage weights
    items = token_items(48, seed=1)
    train(tiny_model(), items, strategy="joint", output_dir=tmp_path, **ARGS)
    with pytest.raises(Interrupt):
        train(tiny_model(), items, strategy="joint", output_dir=tmp_path, overwrite=True,
              callbacks=[CrashAfterSave("stage-1", N // 2)], **ARGS)
    progress = json.loads((tmp_path / PROGRESS_NAME).read_text())
    assert progress["completed"] == []
    result = train(tiny_model(), items, strategy="joint", output_dir=tmp_path, resume=True, **ARGS)
    assert result.stages[0].resumed_from.endswith(f"checkpoint-{N // 2}")

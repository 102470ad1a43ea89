"""The one LM training loop and the objective registry: the schedule by hand, restored flags,
and every registered objective through the same contract (trains, checkpoints without
pickle, resumes after an interruption to the very same weights, refuses other settings)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.lmkit import VOCAB, tiny_lm

import exitwise as ew
from exitwise.lm import OBJECTIVES, get_objective, loop
from exitwise.lm.answers import generate_answers
from exitwise.lm.loop import lr_scale, only_training


def test_lr_schedules_by_hand():
    # constant: warmup (t + 1) / w, then 1
    assert [lr_scale("constant", t, 10, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_scale("constant", 0, 10, 0) == 1.0
    # cosine from 1 down to the floor 0.1 over the 4 post-warmup steps of 6
    got = [lr_scale("cosine", t, 6, 2, 0.1) for t in range(6)]
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * d / 4)) for d in range(4)]
    assert got == pytest.approx(want)
    # linear to 0 at the end (the Hugging Face Trainer's default)
    assert [lr_scale("linear", t, 4, 0) for t in range(4)] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ew.ConfigError, match="schedule"):
        lr_scale("exponential", 0, 4, 0)


@pytest.mark.parametrize("steps, warmup, first_lrs", [
    (8, 20, [1.0, 1.0]),  # a warmup longer than a tenth of the run is cut (here to 0)
    (40, 20, [0.25, 0.5]),  # ... to 4 steps of 40
    (400, 20, [0.05, 0.1]),  # and kept where it fits
])
def test_warmup_is_at_most_a_tenth_of_the_run(steps, warmup, first_lrs):
    weight = torch.nn.Parameter(torch.zeros(2))
    module = torch.nn.Module()
    module.weight = weight
    seen: list[float] = []  # the optimizer's lr at each step
    made: list[torch.optim.Optimizer] = []
    real = torch.optim.AdamW

    def capture(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    def step_loss(t):
        seen.append(made[0].param_groups[0]["lr"])
        return (weight - 1).pow(2).sum(), {}

    task = loop.Task(module=module, params=[weight], root=module, step_loss=step_loss,
                     evaluate=dict, train_mode=lambda: None, settings={})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim, "AdamW", capture)
        loop.run_task(task, loop.LoopSettings(steps=steps, lr=1.0, warmup_steps=warmup),
                      progress=False)
    assert seen[:2] == pytest.approx(first_lrs)
    assert seen[-1] == 1.0


def test_only_training_restores_flags_and_modes_also_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with only_training(model, [model[2].weight]):
            assert [p.requires_grad for p in model.parameters()] == [False, False, True, False]
            model.train()
            raise RuntimeError("boom")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m.training for m in model.modules())


def test_configs_check_themselves_and_refuse_foreign_options():
    assert set(OBJECTIVES) >= {"ce", "kl", "answers", "layerskip", "free", "calm"}
    for name, cls in OBJECTIVES.items():
        assert cls.registered_name == name
        cls()  # the defaults are valid
    with pytest.raises(ew.ConfigError, match="lr"):
        get_objective("kl", lr=-1.0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ew.ConfigError, match="ce_weight"):
            get_objective("kl", ce_weight=bad)
    with pytest.raises(ew.ConfigError, match="no option p_max"):
        get_objective("answers", p_max=0.1)
    with pytest.raises(ew.ConfigError, match="unknown objective"):
        get_objective("medusa")
    with pytest.raises(ew.ConfigError, match="registered twice"):
        ew.lm.register_objective("ce")(type("Again", (ew.lm.ObjectiveConfig,), {}))
    with pytest.raises(ew.ConfigError, match="config must be"):
        ew.tune_exits(None, None, config=3)


def _model():
    lm = tiny_lm("llama", damp=1.0)
    cfg = ew.ExitConfig(layers=[2], head="lm", num_labels=VOCAB,
                        head_kwargs={"adapter": "mlp"}, final_head_kwargs={})
    return ew.attach_exits(lm, cfg)


def _data(name: str):
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, VOCAB, (16,), generator=g).tolist() for _ in range(16)]
    if name != "answers":
        return texts
    return generate_answers(_model(), [t[:5] for t in texts], max_new_tokens=6, progress=False)


SMALL = {"answers": {"epochs": 2.0}, "calm": {"steps": 4, "batch_size": 16}}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains_and_resumes_exactly(name, tmp_path, monkeypatch):
    options = dict(SMALL.get(name, {"steps": 4}), batch_size=4, save_every=2, lr=1e-2)
    if name == "calm":
        options["batch_size"] = 16
    config = get_objective(name, **options)
    data = _data(name)
    full = _model()
    r0 = ew.tune_exits(full, data, config, progress=False)
    assert r0.steps >= 3 and all(math.isfinite(v) for v in r0.loss_history)
    assert set(r0.before) == set(r0.after) and r0.metric in ("agreement", "bce")

    real = loop.save_checkpoint

    def stop_after_step_2(folder, task, optimizer, state):
        real(folder, task, optimizer, state)
        if state["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        ew.tune_exits(_model(), data, config, output_dir=tmp_path, progress=False)
    monkeypatch.undo()
    folder = tmp_path / name
    assert sorted(p.name for p in folder.iterdir()) == [
        "optimizer.safetensors", "state.json", "weights.safetensors"]  # no pickle
    resumed = _model()
    r1 = ew.tune_exits(resumed, data, config, output_dir=tmp_path, progress=False)
    assert r1.start_step == 2 and r1.loss_history == r0.loss_history and r1.after == r0.after
    if name == "calm":
        pairs = zip(r0.artifact.state_dict().items(), r1.artifact.state_dict().items())
    else:
        pairs = zip(full.state_dict().items(), resumed.state_dict().items())
    for (n, a), (_, b) in pairs:
        assert torch.equal(a, b), n
    other = get_objective(name, **dict(options, seed=1))
    with pytest.raises(ew.CheckpointError, match="seed"):
        ew.tune_exits(_model(), data, other, output_dir=tmp_path, progress=False)
    # another held-out share or other data would change which rows trained mid-run
    fraction = 0.5 if name != "calm" else 0.4
    other = get_objective(name, **dict(options, eval_fraction=fraction))
    with pytest.raises(ew.CheckpointError, match="eval_fraction"):
        ew.tune_exits(_model(), data, other, output_dir=tmp_path, progress=False)
    changed = [list(reversed(x)) if name != "answers" else x[::-1] for x in data]
    with pytest.raises(ew.CheckpointError, match="data"):
        ew.tune_exits(_model(), changed, config, output_dir=tmp_path, progress=False)


@pytest.mark.parametrize("cut", ["before_commit", "during_commit"])
def test_an_interrupted_checkpoint_write_resumes_exactly(cut, tmp_path, monkeypatch):
    # an interruption while the files of step 4's checkpoint are written: before the commit
    # the step-2 checkpoint stays whole; after it, the commit is finished on the next read.
    # Either way the resumed run ends as an uninterrupted one (files written in place once
    # left weights of step 4 beside the state of step 2)
    config = get_objective("ce", steps=6, save_every=2, batch_size=4, lr=1e-2)
    data = _data("ce")
    full = _model()
    r0 = ew.tune_exits(full, data, config, progress=False)
    real_json, real_replace = loop.write_json_atomic, loop.os.replace
    armed = {"on": False, "renamed": 0}

    def json_cut(path, data, indent=2):
        if data.get("step") == 4 and cut == "before_commit":
            raise KeyboardInterrupt
        real_json(path, data, indent)
        armed["on"] = data.get("step") == 4

    def replace_cut(src, dst):
        if armed["on"] and str(src).endswith(loop.PENDING):
            armed["renamed"] += 1
            if armed["renamed"] == 2:  # the weights moved, the optimizer and state not yet
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(loop, "write_json_atomic", json_cut)
    monkeypatch.setattr(loop.os, "replace", replace_cut)
    with pytest.raises(KeyboardInterrupt):
        ew.tune_exits(_model(), data, config, output_dir=tmp_path, progress=False)
    monkeypatch.undo()
    folder = tmp_path / "ce"
    pending = sorted(p.name for p in folder.iterdir() if p.name.endswith(loop.PENDING))
    assert pending == (["optimizer.safetensors.pending", "weights.safetensors.pending"]
                       if cut == "before_commit" else  # no pending state: dropped when read
                       ["optimizer.safetensors.pending", "state.json.pending"])
    resumed = _model()
    r1 = ew.tune_exits(resumed, data, config, output_dir=tmp_path, progress=False)
    assert r1.start_step == (2 if cut == "before_commit" else 4)
    assert r1.loss_history == r0.loss_history
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert sorted(p.name for p in folder.iterdir()) == [
        "optimizer.safetensors", "state.json", "weights.safetensors"]

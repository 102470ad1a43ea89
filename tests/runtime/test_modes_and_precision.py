"""Inference paths run in eval mode and give every module its own mode back; half-precision
models run their exit scorers and keep runtime == replay with temperatures; a regression
model takes no temperature; a gated model is refused by the stream runner; text batches may
come as (inputs, labels) pairs."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, tiny_encoder

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.calibration import apply_temperatures
from exitwise.cascade import cascade_members
from exitwise.errors import ConfigError, InputError
from exitwise.policies.uee_ucb import UCBExitSelector, depth_costs
from exitwise.runtime.online import run_stream, split_batch


def _model(**options) -> ew.MultiExitModel:
    return ew.attach_exits(tiny_encoder("bert"), ew.ExitConfig(
        layers="all", head="linear", num_labels=3, **options))


def test_inference_paths_restore_every_modules_own_mode():
    # a model in train mode with one part the user keeps in eval mode: caching exit logits
    # and streaming run in eval mode and give each module its own mode back (setting the
    # whole model to its root's mode once turned the frozen part back to training)
    model = _model().train()
    frozen = model.backbone.model.embeddings
    frozen.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    batch = padded_batch()
    cached = collect_exit_logits(model, [dict(batch, labels=torch.tensor([0, 1, 2, 0]))],
                                 progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
    run_stream(model, [batch], UCBExitSelector(depth_costs([1, 2, 3, 4])))
    assert {n: m.training for n, m in model.named_modules()} == modes
    model.eval()
    assert torch.equal(cached.logits, collect_exit_logits(
        model, [dict(batch, labels=torch.tensor([0, 1, 2, 0]))], progress=False).logits)


def test_a_cascade_of_training_members_runs_them_in_eval_mode():
    # members returned by training are in train mode: the cascade's answers must not carry
    # dropout noise (two runs once differed, and differed from the cache and its replay)
    models = cascade_members(tiny_encoder("bert"), (2, None), num_labels=3, head="linear")
    cascade = ew.ModelCascade(models).train()
    batch = padded_batch()
    policy = ew.get_policy("confidence", threshold=0.5)
    first, second = cascade.run(policy, **batch), cascade.run(policy, **batch)
    assert torch.equal(first.logits, second.logits)
    assert all(m.training for m in models)
    cascade.eval()
    assert torch.equal(cascade.run(policy, **batch).logits, first.logits)
    assert torch.equal(models[0].train().full_depth(**batch),
                       models[0].eval().full_depth(**batch))


@pytest.mark.parametrize("scorer", ["lte", "cats", "dact"])
def test_half_precision_models_run_their_exit_scorers(scorer):
    model = _model(dropout=0.0)
    model.attach_scorer(scorer)
    model = model.to(torch.bfloat16).eval()
    batch = padded_batch()
    out = model(**batch)
    assert out.scores is None or all(s.dtype == torch.float32 for s in out.scores if s is not None)
    policy = ew.get_policy(scorer)  # each reads its scorer's score (its own defaults)
    res = model.early_exit(policy, **batch)
    assert res.logits.shape == (4, 3)


def test_half_precision_runtime_equals_replay_with_temperatures():
    # the executor scales logits in float32, as replay scales the cached copy (a bf16
    # division once moved rows to other exits)
    model = _model(dropout=0.0).to(torch.bfloat16).eval()
    apply_temperatures(model, [0.7, 1.3, 2.1, 1.0])
    assert model.temperatures.dtype == torch.float32
    assert model.temperature_list() == pytest.approx([0.7, 1.3, 2.1, 1.0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (64, 8), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cache = collect_exit_logits(model, [dict(batch, labels=torch.zeros(64, dtype=torch.long))],
                                progress=False)
    for threshold in (0.9, 1.0, 1.05, 1.1):
        policy = ew.get_policy("entropy", threshold=threshold)
        live = model.early_exit(policy, **batch)
        assert torch.equal(live.exit_index, replay(policy, cache, model.temperatures).exit_index)


def test_a_regression_model_takes_no_temperature():
    model = ew.attach_exits(tiny_encoder("bert"), ew.ExitConfig(layers="all", head="linear",
                                                                num_labels=1))
    apply_temperatures(model, [1.0] * 4)  # ones: nothing to scale, accepted
    with pytest.raises(ConfigError, match="regression"):
        apply_temperatures(model, [2.0] * 4)


def test_a_gated_model_cannot_stream_and_text_pairs_are_read():
    model = ew.attach_exits(tiny_encoder("bert"), ew.ExitConfig(
        layers="all", head="smartbert", num_labels=2, head_kwargs={"width": 16}))
    model.attach_gate("smartbert", width=16)
    with pytest.raises(InputError, match="skip gate"):
        run_stream(model.eval(), [padded_batch()], UCBExitSelector(depth_costs([1, 2, 3, 4])))
    batch = padded_batch()
    inputs, labels = split_batch((batch, torch.tensor([1, 0, 1, 0])))
    assert set(inputs) == set(batch) and labels.tolist() == [1, 0, 1, 0]

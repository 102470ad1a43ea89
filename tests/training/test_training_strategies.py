"""Contract tests run over every registered training strategy.

Each strategy is built on the heads it is meant for (``STRATEGY_HEADS``; pooler heads
otherwise), so the run shows no "wrong heads" warnings.
"""

from __future__ import annotations

import pytest
import torch
from helpers.trainkit import FAST, StageRecorder, tiny_model, token_items

from exitwise.errors import ConfigError
from exitwise.heads.base import build_head
from exitwise.policies import get_policy
from exitwise.training import STRATEGIES, PaddingCollator, get_strategy, train

# The heads each recipe is meant for (ExitConfig keywords); the others get pooler heads.
STRATEGY_HEADS: dict[str, dict] = {
    "cascadebert": {"layers": [4]},  # a complete model, one cascade member: its final exit
    "boosted": {"head": "cascade", "head_kwargs": {"base": "mean", "combine": "additive"}},
    "imta": {"head": "cascade",
             "head_kwargs": {"base": "mean", "combine": "isc", "detach_previous": False}},
    "ztw": {"head": "cascade", "head_kwargs": {"base": "mean"}, "final_head": "pooler",
            "final_head_kwargs": {}},
    "lgvit": {"head": {1: "lgvit_local", 2: "lgvit_local", 3: "lgvit_global", 4: "pooler"}},
    "copycat_sl_vit": {"head": "vit_layer", "final_head": "pooler", "final_head_kwargs": {}},
    "past_future": {"head": "past_future"},
    "smartbert": {"head": "smartbert"},
}

# Options for the contract run: CopycatSL-ViT's first stage trains the exits on the labels and
# its second on a random network's predictions, which undoes the first; the contract checks
# the copying stage alone (the two stages have their own test).
# BERxiT's learning-to-exit stage trains one linear layer: 12 steps need a larger step.
STRATEGY_OPTIONS: dict[str, dict] = {"copycat_sl_vit": {"pretrain_exits": False},
                                     "berxit": {"stage_args": [{}, {"learning_rate": 5e-2}]}}


def _stage_loss(model, stage, items) -> float:
    batch = PaddingCollator()(items)
    labels = batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return float(stage.loss(model(**batch, **stage.forward_kwargs), labels))


def _params_with_grad(model, stage, items) -> set[str]:
    """Names of parameters (aliases included) that get a gradient from the stage's loss."""
    batch = PaddingCollator()(items[:16])
    labels = batch.pop("labels")
    model.zero_grad(set_to_none=True)
    stage.loss(model(**batch, **stage.forward_kwargs), labels).backward()
    touched = {id(p) for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in touched}


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_strategy_contract(name, tmp_path):
    items = token_items(64, seed=0)
    model = tiny_model(**STRATEGY_HEADS.get(name, {}))
    options = STRATEGY_OPTIONS.get(name, {})
    stages = get_strategy(name, **options).stages(model)
    losses_before = [_stage_loss(model, s, items) for s in stages]
    recorder = StageRecorder()

    result = train(
        model,
        items,
        strategy=name,
        strategy_options=options,
        output_dir=tmp_path,
        callbacks=[recorder],
        max_steps=12,
        save_final=False,
        **FAST,
    )

    assert [s.name for s in result.stages] == [s.name for s in stages]
    assert all(s.global_step == 12 and not s.skipped for s in result.stages)
    for stage in stages:
        before, after = recorder.before[stage.name], recorder.after[stage.name]
        trainable = stage.trainable_names(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        frozen_changed = changed - trainable
        assert not frozen_changed, (
            f"{name}/{stage.name}: frozen params changed: {sorted(frozen_changed)[:5]}"
        )
        # Every trainable parameter that receives a gradient must have moved.
        expected = _params_with_grad(model, stage, items) & trainable & set(before)
        assert expected, f"{name}/{stage.name} trains nothing"
        assert expected <= changed, (
            f"{name}/{stage.name}: not updated: {sorted(expected - changed)[:5]}"
        )
    losses_after = [_stage_loss(model, s, items) for s in stages]
    for stage, lb, la in zip(stages, losses_before, losses_after):
        # A distillation KL between a tiny model's near-uniform distributions starts near 0:
        # there it must at least halve.
        dropped = la < lb - 0.01 or (lb < 0.05 and la < 0.5 * lb)
        assert dropped, f"{name}/{stage.name}: loss {lb:.4f} -> {la:.4f} did not drop"
    # requires_grad flags are restored after training.
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone_tuned is STRATEGIES.get(name).tunes_backbone


def test_two_stage_freezes_what_deebert_freezes():
    model = tiny_model()
    s1, s2 = get_strategy("two_stage").stages(model)
    final = model.num_exits - 1
    names1, names2 = s1.trainable_names(model), s2.trainable_names(model)
    assert any(n.startswith("backbone.") for n in names1)
    assert {n for n in names1 if n.startswith("heads.")} == {
        f"heads.{final}.{n}" for n, _ in model.heads[final].named_parameters()
    }
    assert not any(n.startswith("backbone.") or n.startswith(f"heads.{final}.") for n in names2)
    assert {n.split(".")[1] for n in names2} == {str(k) for k in range(final)}


def test_exits_only_keeps_backbone_frozen_and_trains_every_head():
    model = tiny_model()
    (stage,) = get_strategy("exits_only").stages(model)
    names = stage.trainable_names(model)
    assert not any(n.startswith("backbone.") for n in names)
    assert {n.split(".")[1] for n in names} == {str(k) for k in range(model.num_exits)}


@pytest.mark.parametrize("make", [
    lambda: get_strategy("ztw", train_backbone="false"),
    lambda: get_strategy("cats", finetune="no"),
    lambda: get_strategy("copycat_sl_vit", pretrain_exits="false"),
    lambda: get_strategy("boosted", gradient_rescaling="false"),
    lambda: get_strategy("imta", gradient_equilibrium="false"),
    lambda: get_strategy("smartbert", hard_weight="false"),
    lambda: build_head("lm", 8, 16, conditioned="no"),
    lambda: build_head("cascade", 8, 3, detach_previous="no"),
    lambda: get_policy("window", ensemble="yes"),
], ids=["ztw", "cats", "copycat", "boosted", "imta", "smartbert", "lm", "cascade", "window"])
def test_a_switch_takes_a_boolean_not_a_string(make):
    # bool("false") is True: ztw once tuned the backbone when told train_backbone="false"
    with pytest.raises(ConfigError, match="must be True or False; got"):
        make()


@pytest.mark.parametrize("hidden", [0, -3, 2.5])
def test_cats_scorer_width_is_a_positive_int(hidden):
    # 0 once trained a constant scorer; -3 failed inside torch
    with pytest.raises(ConfigError, match="hidden"):
        get_strategy("cats", hidden=hidden)


def test_romebert_names_its_own_weight():
    with pytest.raises(ConfigError, match="gamma must be in"):
        get_strategy("romebert", gamma=2)


def test_class_names_as_labels_are_a_clear_error(tmp_path):
    # int('positive') once failed inside the label scan with a bare ValueError
    from exitwise.errors import DataError

    model = tiny_model()
    data = [{**item, "labels": "positive"} for item in token_items(4)]
    with pytest.raises(DataError, match="class ids 0..1; got 'positive'"):
        train(model, data, strategy="joint", output_dir=str(tmp_path), **FAST)

"""The real early-exit executor: rows leave the batch, padding is trimmed, skipped blocks are
never computed, and FLOPs / time are accounted per row."""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_FAMILIES, padded_batch, tiny_encoder

import exitwise as ew
from exitwise.runtime import exit_cost_table, full_depth_cost

LENGTHS = (9, 3, 6, 4, 2)
PAD_ID = {"roberta": 1, "xlm-roberta": 1, "camembert": 1}


def make_model(family: str = "bert", layers="all") -> ew.MultiExitModel:
    torch.manual_seed(0)
    model = ew.attach_exits(tiny_encoder(family), layers=layers, head="linear", num_labels=3)
    with torch.no_grad():
        for h in model.heads:
            h.classifier.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def bert_model():
    return make_model()


def record_block_inputs(backbone) -> tuple[list[tuple[int, ...]], list]:
    """Shapes of the hidden states entering each block call, in call order."""
    shapes: list[tuple[int, ...]] = []
    modules = {id(backbone.block(i)): backbone.block(i) for i in range(backbone.num_layers)}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
        for m in modules.values()
    ]
    return shapes, handles


def longest_row_leaves_first(model, batch) -> torch.Tensor:
    """Oracle labels: the longest row is right at exit 0; the others are wrong there."""
    with torch.no_grad():
        first = model(**batch).logits[0].argmax(-1)
    labels = (first + 1) % model.num_labels
    longest = int(batch["attention_mask"].sum(1).argmax())
    labels[longest] = first[longest]
    return labels


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_rows_leave_and_padding_is_trimmed(family):
    model = make_model(family)
    batch = padded_batch(LENGTHS, pad_id=PAD_ID.get(family, 0))
    labels = longest_row_leaves_first(model, batch)
    shapes, handles = record_block_inputs(model.backbone)
    try:
        res = model.early_exit(ew.get_policy("oracle"), labels=labels, **batch)
    finally:
        for h in handles:
            h.remove()
    lengths = torch.tensor(LENGTHS)
    assert int(res.exit_layer[0]) == 1  # the 9-token row left after block 1
    assert len(shapes) == len(res.rows_per_layer) == int(res.exit_layer.max())
    for i, shape in enumerate(shapes):
        running = res.exit_layer > i  # rows that entered block i
        assert res.rows_per_layer[i] == int(running.sum())
        assert shape[0] == int(running.sum())
        assert shape[1] == int(lengths[running].max()), f"block {i} saw untrimmed padding"
    assert shapes[1][1] < max(LENGTHS)


def test_keep_trims_trailing_padding_in_the_state(bert_model):
    state = bert_model.backbone.start(**padded_batch(LENGTHS))
    assert state.hidden.shape[:2] == (5, 9)
    small = bert_model.backbone.keep(state, torch.tensor([1, 4]))
    assert small.hidden.shape[:2] == (2, 3) and small.mask.shape == (2, 3)
    assert small.mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    torch.testing.assert_close(small.hidden, state.hidden[[1, 4], :3])


def test_deberta_keep_trims_its_per_row_tensors():
    backbone = ew.HFEncoderBackbone(tiny_encoder("deberta-v2"))
    state = backbone.start(**padded_batch(LENGTHS))
    assert state.rows["embeddings"].shape[:2] == (5, 9)
    small = backbone.keep(state, torch.tensor([2]))
    assert small.rows["embeddings"].shape[:2] == (1, 6)
    assert small.shared["relative_pos"].shape[-1] == 6


def test_skipped_blocks_are_never_computed(bert_model):
    shapes, handles = record_block_inputs(bert_model.backbone)
    try:
        res = bert_model.early_exit(ew.get_policy("static", exit=1), profile=True,
                                    **padded_batch(LENGTHS))
    finally:
        for h in handles:
            h.remove()
    assert len(shapes) == 2 and res.rows_per_layer == [5, 5]
    assert res.exit_layer.tolist() == [2] * 5 and len(res.layer_seconds) == 2


def test_exit_layers_follow_the_placement():
    model = make_model(layers=[2])
    res = model.early_exit(ew.get_policy("static", exit=0), **padded_batch(LENGTHS))
    assert model.exit_layers == [2, 4]
    assert res.exit_index.tolist() == [0] * 5 and res.exit_layer.tolist() == [2] * 5
    res = model.early_exit(ew.get_policy("never"), **padded_batch(LENGTHS))
    assert res.exit_index.tolist() == [1] * 5 and res.exit_layer.tolist() == [4] * 5


def test_flops_of_early_rows_are_below_full_depth(bert_model):
    batch = padded_batch(LENGTHS)
    labels = longest_row_leaves_first(bert_model, batch)
    res = bert_model.early_exit(ew.get_policy("oracle"), labels=labels, **batch)
    state = bert_model.backbone.start(**batch)
    table = exit_cost_table(bert_model, state)
    full = full_depth_cost(bert_model, state)
    assert table.shape == (5, bert_model.num_exits) and table.dtype == torch.float64
    assert (table.diff(dim=1) > 0).all(), "leaving later must cost more"
    order = torch.tensor(LENGTHS).argsort()
    assert (table[order].diff(dim=0) > 0).all(), "longer rows must cost more"
    torch.testing.assert_close(res.flops, table.gather(1, res.exit_index[:, None])[:, 0])
    early = res.exit_index < bert_model.num_exits - 1
    assert early.any()
    assert (res.flops[early] < full[early]).all()
    # leaving at the final exit costs the full model plus every exit head on the way
    assert (table[:, -1] > full).all()


def test_executed_flops_count_padding_and_skipped_work(bert_model):
    equal = padded_batch((6, 6, 6))
    never = bert_model.early_exit(ew.get_policy("never"), **equal)
    # no padding: the work done is exactly the rows' own costs
    assert never.executed_flops == pytest.approx(float(never.flops.sum()))
    padded = bert_model.early_exit(ew.get_policy("never"), **padded_batch(LENGTHS))
    assert padded.executed_flops > float(padded.flops.sum())
    early = bert_model.early_exit(ew.get_policy("static", exit=0), **padded_batch(LENGTHS))
    assert 0 < early.executed_flops < padded.executed_flops


def test_profile_fills_per_layer_seconds(bert_model):
    batch = padded_batch(LENGTHS)
    res = bert_model.early_exit(ew.get_policy("never"), profile=True, **batch)
    assert len(res.layer_seconds) == bert_model.backbone.num_layers
    assert all(s > 0 for s in res.layer_seconds)
    plain = bert_model.early_exit(ew.get_policy("never"), **batch)
    assert plain.layer_seconds == []
    off = bert_model.early_exit(ew.get_policy("never"), count_flops=False, **batch)
    assert off.executed_flops == 0.0 and not off.flops.any()
    torch.testing.assert_close(off.logits, plain.logits)


def test_temperatures_scale_logits_before_the_policy():
    model = make_model()
    batch = padded_batch(LENGTHS)
    raw = model.full_depth(**batch)
    model.temperatures.copy_(torch.tensor([1e-3, 1.0, 1.0, 2.0]))
    res = model.early_exit(ew.get_policy("never"), **batch)
    torch.testing.assert_close(res.logits, raw / 2.0)
    # a tiny temperature at exit 0 makes every row certain there
    res = model.early_exit(ew.get_policy("entropy", threshold=1e-3), **batch)
    assert res.exit_index.tolist() == [0] * len(LENGTHS)
    with torch.no_grad():
        torch.testing.assert_close(res.logits, model(**batch).logits[0] / 1e-3)


def test_results_do_not_depend_on_row_order(bert_model):
    batch = padded_batch(LENGTHS)
    with torch.no_grad():
        ent = ew.policies.entropy.prediction_entropy(bert_model(**batch).logits[0]).sort().values
    policy = ew.get_policy("entropy", threshold=float(ent[1:3].mean()))
    res = bert_model.early_exit(policy, **batch)
    perm = torch.tensor([3, 0, 4, 2, 1])
    shuffled = bert_model.early_exit(policy, **{k: v[perm] for k, v in batch.items()})
    assert torch.equal(shuffled.exit_index, res.exit_index[perm])
    torch.testing.assert_close(shuffled.logits, res.logits[perm], atol=1e-5, rtol=0)


def test_early_exit_runs_a_train_mode_model_in_eval_mode_and_restores_it():
    # after train() the model is in train mode: early exit still answers as the evaluated
    # model does (no dropout, BatchNorm on running statistics, none of them updated), and
    # every module's own mode comes back
    from helpers.vision import SIZE, tiny_vision

    pytest.importorskip("timm")
    net = tiny_vision("tv-resnet")
    model = ew.attach_exits(net, ew.ExitConfig(layers=[2, 4], head="sdn", num_labels=3))
    x = torch.randn(3, 3, SIZE, SIZE)
    policy = ew.get_policy("confidence", threshold=0.5)
    model.eval()
    want = model.early_exit(policy, pixel_values=x)
    model.train()
    model.heads[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = model.early_exit(policy, pixel_values=x)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.exit_index, want.exit_index)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {name: m.training for name, m in model.named_modules()} == modes

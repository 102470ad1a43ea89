"""Skip gates at run time (``model.attach_gate``, ``model.block_step``, ``Backbone.step_rows``):
a row whose gate skips a block is really not computed in it, results equal a layer-by-layer
reference that leaves that row's block out, a row is not offered the exit of a block it
skipped, batch == one row at a time, replay == runtime, per-row costs count only the blocks a
row ran, and the gate saves and loads with the heads."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import padded_batch, tiny_encoder

import exitwise as ew
from exitwise.analysis import ExitLogitsCache, collect_exit_logits, replay
from exitwise.errors import UnsupportedModelError
from exitwise.policies.entropy import prediction_entropy
from exitwise.runtime import exit_cost_table
from exitwise.runtime.export import segments_of

LENGTHS = (7, 4, 9, 5, 3, 8, 6, 2, 9, 1)


@functools.cache
def gated_model() -> ew.MultiExitModel:
    """A tiny BERT with smartbert heads and gates whose decisions differ between rows (the
    gates' output layers are scaled up so that the probabilities spread away from 0.5)."""
    model = ew.attach_exits(tiny_encoder("bert"), ew.ExitConfig(
        layers="all", head="smartbert", num_labels=2, dropout=0.0, head_kwargs={"width": 16}))
    torch.manual_seed(0)
    gate = model.attach_gate("smartbert", dropout=0.0, width=16)
    with torch.no_grad():
        for out in gate.out:
            out.weight.mul_(10.0)
        for head in model.heads:  # confident enough exits that entropy thresholds split rows
            head.classifier.weight.mul_(30.0)
    return model.eval()


def rows_of(batch: dict) -> list[torch.Tensor]:
    return [batch["input_ids"][r, : int(n)] for r, n in enumerate(batch["attention_mask"].sum(1))]


def reference(model: ew.MultiExitModel, ids: torch.Tensor):
    """One unpadded row, block by block with the model's own modules: gate i reads the block's
    input; a skipped block is not called. Returns per block: (ran, [CLS] of its input, the
    head's logits after it)."""
    bb, gate = model.backbone, model.gate
    h = bb.embeddings(input_ids=ids[None])
    ran, cls_in, logits = [], [], []
    with torch.no_grad():
        for i in range(bb.num_layers):
            go = bool(gate(i, h, None)[0] < gate.threshold)
            cls_in.append(h[0, 0].clone())
            if go:
                out = bb.blocks[i](h)
                h = out[0] if isinstance(out, tuple) else out
            ran.append(go)
            logits.append(model.heads[i](h, None)[0])
    return ran, cls_in, logits


def test_gate_decisions_are_mixed_here():
    """The fixture is not vacuous: some block is run by some rows and skipped by others."""
    model = gated_model()
    ran = torch.tensor([reference(model, ids)[0] for ids in rows_of(padded_batch(LENGTHS))])
    assert (ran.any(0) & ~ran.all(0)).any(), ran


def test_skipping_rows_do_not_enter_the_block_and_results_equal_the_reference():
    model = gated_model()
    batch = padded_batch(LENGTHS)
    refs = [reference(model, ids) for ids in rows_of(batch)]
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [model.backbone.blocks[i].register_forward_pre_hook(
        lambda _m, args, i=i: seen.setdefault(i, []).append(args[0][:, 0].detach().clone()))
        for i in range(model.backbone.num_layers)]
    try:
        result = model.early_exit(ew.get_policy("never"), **batch)
    finally:
        for h in hooks:
            h.remove()
    for i in range(model.backbone.num_layers):
        running = [r for r, ref in enumerate(refs) if ref[0][i]]
        calls = seen.get(i, [])
        assert len(calls) == (1 if running else 0), i  # one call on the running rows, or none
        assert result.rows_per_layer[i] == len(running)
        if running:  # exactly the running rows entered, with the reference's inputs
            torch.testing.assert_close(calls[0], torch.stack([refs[r][1][i] for r in running]),
                                       atol=1e-5, rtol=1e-4)
    # Never exit: every row's final logits are the reference's, and forward's too.
    final = torch.stack([ref[2][-1] for ref in refs])
    torch.testing.assert_close(result.logits, final, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        out = model(**batch)
    for k in range(model.num_exits):
        torch.testing.assert_close(out.logits[k], torch.stack([ref[2][k] for ref in refs]),
                                   atol=1e-5, rtol=1e-4)


def entropy_policy(model, batch) -> ew.ExitPolicy:
    """An entropy threshold at the median entropy of the first offered exits."""
    with torch.no_grad():
        logits = model(**batch).logits
    ent = torch.cat([prediction_entropy(z) for z in logits[:-1]])
    return ew.get_policy("entropy", threshold=float(ent.median()))


def by_hand_exit(ref, threshold: float) -> int:
    """The first exit whose block the row ran with entropy <= threshold, else the last."""
    ran, _, logits = ref
    for k in range(len(logits) - 1):
        if ran[k] and float(prediction_entropy(logits[k][None])[0]) <= threshold:
            return k
    return len(logits) - 1


def test_a_row_is_not_offered_the_exit_of_a_skipped_block_and_batch_equals_alone():
    model = gated_model()
    batch = padded_batch(LENGTHS)
    policy = entropy_policy(model, batch)
    live = model.early_exit(policy, **batch)
    refs = [reference(model, ids) for ids in rows_of(batch)]
    want = [by_hand_exit(ref, policy.value) for ref in refs]
    assert live.exit_index.tolist() == want
    assert 0 < sum(k < model.num_exits - 1 for k in want) < len(want)  # mixed exits
    # A skipped exit that would have passed the rule is passed over: it happens here.
    offered_only = [any(not ref[0][k] and float(prediction_entropy(ref[2][k][None])[0])
                        <= policy.value for k in range(model.num_exits - 1)) for ref in refs]
    assert any(offered_only)
    for r, ids in enumerate(rows_of(batch)):
        alone = model.early_exit(policy, input_ids=ids[None],
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert int(alone.exit_index[0]) == int(live.exit_index[r])
        torch.testing.assert_close(alone.logits[0], live.logits[r], atol=1e-5, rtol=1e-4)
        assert float(alone.flops[0]) == float(live.flops[r])


@pytest.mark.parametrize("name", ["entropy", "confidence", "patience", "never"])
def test_replay_equals_runtime_on_a_gated_model(name):
    model = gated_model()
    batch = padded_batch(LENGTHS)
    cache = collect_exit_logits(model, [batch], progress=False)
    refs = [reference(model, ids) for ids in rows_of(batch)]
    assert cache.skipped.tolist() == [[not x for x in ref[0]] for ref in refs]
    policy = entropy_policy(model, batch) if name == "entropy" else ew.get_policy(name)
    if name == "confidence":
        policy = policy.with_param(float(torch.softmax(cache.logits[:, 0], -1).amax(-1).median()))
    live = model.early_exit(policy, **batch)
    offline = replay(policy, cache, model.temperatures)
    assert torch.equal(offline.exit_index, live.exit_index)
    assert torch.equal(offline.costs, live.flops)
    assert not bool((cache.skipped[torch.arange(len(LENGTHS)), live.exit_index]
                     & (live.exit_index < model.num_exits - 1)).any())


def test_costs_count_only_the_blocks_a_row_ran_plus_the_gates():
    model = gated_model()
    batch = padded_batch(LENGTHS)
    cache = collect_exit_logits(model, [batch], progress=False)
    bb = model.backbone
    state = bb.start(**batch)
    mask = state.mask
    blocks = torch.stack([bb.layer_flops(i, state) for i in range(bb.num_layers)], 1)
    gates = torch.stack([model.gate.gate_flops(i, mask, len(LENGTHS))
                         for i in range(bb.num_layers)], 1)
    heads = torch.stack([h.head_flops(mask, len(LENGTHS)) for h in model.heads], 1)
    ran = (~cache.skipped).double()
    want = bb.start_flops(state)[:, None] + ((blocks * ran + gates).cumsum(1)
                                             + heads.cumsum(1))
    torch.testing.assert_close(cache.costs, want)
    assert bool((gates > 0).all()) and bool((cache.skipped).any())
    # A gated table without the skips is the plain table plus the gates.
    torch.testing.assert_close(exit_cost_table(model, state), want + (blocks * (1 - ran)).cumsum(1))


def test_gate_saves_and_loads_bit_identical(tmp_path):
    model = gated_model()
    model.gate.threshold = 0.6
    try:
        model.save_pretrained(tmp_path, save_backbone=True)
        back = ew.MultiExitModel.from_pretrained(tmp_path)
    finally:
        model.gate.threshold = 0.5
    assert type(back.gate).registered_name == "smartbert" and back.gate.threshold == 0.6
    assert back.gate.options == {**model.gate.options, "threshold": 0.6}
    mine, theirs = model.gate.state_dict(), back.gate.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    back.gate.threshold = 0.5
    batch = padded_batch(LENGTHS)
    policy = entropy_policy(model, batch)
    a, b = model.early_exit(policy, **batch), back.early_exit(policy, **batch)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.logits, b.logits)


def test_sequential_backbone_skips_rows_too_and_export_refuses_gates():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
                                   for _ in range(3)])
    backbone = ew.SequentialBackbone(blocks, example=torch.randn(1, 8))
    model = ew.attach_exits(backbone, ew.ExitConfig(layers="all", head="linear", num_labels=3,
                                                   dropout=0.0))
    gate = model.attach_gate("smartbert", dropout=0.0, width=8, num_heads=1)
    with torch.no_grad():
        for out in gate.out:
            out.weight.mul_(20.0)
    model.eval()
    x = torch.randn(12, 8)
    with torch.no_grad():  # the threshold at the median of block 0's gate: half skip it
        gate.threshold = float(gate(0, x, None).median())
        skips = [gate.skip(0, x, None)]
    assert skips[0].any() and not skips[0].all()
    live = model.early_exit(ew.get_policy("never"), pixel_values=x)
    # Rows that skip block 0 keep their input there: compare with running them by hand.
    with torch.no_grad():
        h = torch.where(skips[0][:, None], x, blocks[0](x))
        for i in (1, 2):
            h = torch.where(gate.skip(i, h, None)[:, None], h, blocks[i](h))
        want = model.heads[-1](h)
    torch.testing.assert_close(live.logits, want)
    cache = collect_exit_logits(model, [(x, torch.zeros(12, dtype=torch.long))], progress=False)
    offline = replay(ew.get_policy("never"), cache)
    assert torch.equal(offline.costs, live.flops)
    with pytest.raises(UnsupportedModelError, match="skip gate"):
        segments_of(model)


def test_cache_keeps_the_skips_through_save_subset_and_concat(tmp_path):
    model = gated_model()
    cache = collect_exit_logits(model, [padded_batch(LENGTHS)], progress=False)
    back = ExitLogitsCache.load(cache.save(tmp_path / "c.safetensors"))
    assert torch.equal(back.skipped, cache.skipped) and back.skipped.dtype == torch.bool
    assert torch.equal(back.subset([3, 1]).skipped, cache.skipped[[3, 1]])
    both = ExitLogitsCache.concat([cache.subset([0, 1]), cache.subset([2])])
    assert torch.equal(both.skipped, cache.skipped[:3])
    plain = ExitLogitsCache(cache.logits, cache.labels, cache.costs, cache.full_cost,
                               cache.exit_layers)
    with pytest.raises(ew.InputError, match="gated"):
        ExitLogitsCache.concat([cache, plain])


def test_a_gate_that_never_skips_changes_nothing_but_the_cost():
    model = gated_model()
    batch = padded_batch(LENGTHS)
    gate = model.gate
    gate.threshold = 2.0  # a probability never reaches it
    try:
        gated = model.early_exit(ew.get_policy("never"), **batch)
        model.gate = None
        plain = model.early_exit(ew.get_policy("never"), **batch)
        reference = model.full_depth(**batch)
    finally:
        model.gate = gate
        gate.threshold = 0.5
    assert torch.equal(gated.logits, plain.logits)
    torch.testing.assert_close(gated.logits, reference, atol=1e-5, rtol=1e-4)
    assert bool((gated.flops > plain.flops).all())  # the gates' own work


def test_executed_flops_count_only_the_blocks_rows_ran():
    # the executor's executed FLOPs once counted the work of rows that skipped a block
    model = gated_model()
    res = model.early_exit(ew.get_policy("never"), **padded_batch((6,) * 6, seed=3))
    assert min(res.rows_per_layer) < 6  # some rows skipped blocks
    assert res.executed_flops == pytest.approx(float(res.flops.sum()))

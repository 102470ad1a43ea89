"""DESIGN.md invariants for every Hugging Face encoder family the adapter table supports.

- never-exit == the backbone's own forward (+ final head), and the adapter's final hidden
  state == ``backbone(**batch).last_hidden_state`` on a right-padded batch;
- per-row exits on a padded batch == each row run alone, unpadded;
- token_type_ids are honoured, and the content of padded positions does not matter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ENCODER_FAMILIES, VOCAB, padded_batch, tiny_encoder

import exitwise as ew
from exitwise.policies.entropy import prediction_entropy

LENGTHS = (7, 4, 9, 5, 2)
PAD_ID = {"roberta": 1, "xlm-roberta": 1, "camembert": 1}  # RoBERTa-family tokenizers pad with id 1
ATOL = 1e-5


def batch_for(family: str, lengths=LENGTHS, seed: int = 1, token_types: bool = True):
    """Right-padded batch in the family's own pad id, with segment ids where the model has them."""
    batch = padded_batch(lengths, seed=seed, pad_id=PAD_ID.get(family, 0))
    if token_types and family != "distilbert":
        types = torch.zeros_like(batch["input_ids"])
        for r, n in enumerate(lengths):
            types[r, n // 2 : n] = 1  # second "sentence" of each row
        batch["token_type_ids"] = types
    return batch


def row_alone(batch: dict, r: int) -> dict:
    """Row r of a right-padded batch, cut to its real length (no padding at all)."""
    n = int(batch["attention_mask"][r].sum())
    return {k: v[r : r + 1, :n] for k, v in batch.items()}


@pytest.fixture(scope="module", params=ENCODER_FAMILIES)
def encoder_model(request):
    family = request.param
    encoder = tiny_encoder(family)
    torch.manual_seed(0)
    model = ew.attach_exits(encoder, ew.ExitConfig(layers="all", head="pooler", num_labels=3))
    # Larger classifier weights so that random exits disagree and entropies spread out.
    with torch.no_grad():
        for head in model.heads:
            head.classifier.weight.mul_(8.0)
    return family, encoder, model.eval()


def test_never_exit_reproduces_backbone(encoder_model):
    family, encoder, model = encoder_model
    batch = batch_for(family)
    res = model.early_exit(ew.get_policy("never"), **batch)
    full = model.full_depth(**batch)
    with torch.no_grad():
        all_exits = model(**batch).logits
        own_hidden = encoder(**batch).last_hidden_state  # HF's own forward, no exitwise code
        own_logits = model.heads[-1](own_hidden, batch["attention_mask"])

    assert res.exit_index.tolist() == [model.num_exits - 1] * len(LENGTHS)
    assert res.exit_layer.tolist() == [4] * len(LENGTHS)
    assert len(all_exits) == model.num_exits == 4
    torch.testing.assert_close(full, own_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(res.logits, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(all_exits[-1], full, atol=ATOL, rtol=0)


def test_adapter_final_hidden_equals_backbone(encoder_model):
    family, encoder, model = encoder_model
    batch = batch_for(family)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        state = model.backbone.start(**batch)
        for i in range(model.backbone.num_layers):
            state = model.backbone.step(i, state)
        own = encoder(**batch).last_hidden_state
    assert state.hidden.shape == own.shape
    torch.testing.assert_close(state.hidden[real], own[real], atol=ATOL, rtol=0)


def midpoint_threshold(values: torch.Tensor) -> float:
    """A threshold halfway between the two middle values: no row sits on the boundary, so
    float noise between batched and single-row runs cannot flip a decision."""
    v = values.sort().values
    k = (len(v) - 1) // 2
    return float((v[k] + v[k + 1]) / 2)


def assert_rows_match_alone(model, policy, batch, all_exits: bool = False) -> ew.EarlyExitResult:
    """Batched early exit == each row alone (predictions, exit index/layer, logits); with
    ``all_exits`` also every exit's logits from ``model(**batch)``."""
    res = model.early_exit(policy, **batch)
    if all_exits:
        with torch.no_grad():
            batched_all = model(**batch).stacked()
    for r in range(batch["input_ids"].shape[0]):
        alone = model.early_exit(policy, **row_alone(batch, r))
        assert int(alone.exit_index) == int(res.exit_index[r]), f"row {r}"
        assert int(alone.exit_layer) == int(res.exit_layer[r]), f"row {r}"
        assert int(alone.predictions) == int(res.predictions[r]), f"row {r}"
        torch.testing.assert_close(alone.logits[0], res.logits[r], atol=ATOL, rtol=0)
        # The cost of a row is its own: same FLOPs alone or in a padded batch.
        assert float(alone.flops) == pytest.approx(float(res.flops[r]))
        if not all_exits:
            continue
        with torch.no_grad():
            alone_all = model(**row_alone(batch, r)).stacked()
        torch.testing.assert_close(alone_all[0], batched_all[r], atol=ATOL, rtol=0)
    return res


def test_per_row_exits_equal_rows_alone_entropy(encoder_model):
    family, _, model = encoder_model
    batch = batch_for(family)
    with torch.no_grad():
        first = prediction_entropy(model(**batch).logits[0])
    policy = ew.get_policy("entropy", threshold=midpoint_threshold(first))
    res = assert_rows_match_alone(model, policy, batch, all_exits=True)
    assert len(set(res.exit_index.tolist())) >= 2, "the batch should exit at mixed points"
    assert 0 in res.exit_index.tolist()


def test_per_row_exits_equal_rows_alone_stateful(encoder_model):
    # A stateful policy (PABEE): its per-row state must follow the rows as the batch shrinks.
    family, _, model = encoder_model
    assert_rows_match_alone(model, ew.get_policy("patience", patience=1), batch_for(family))


def test_padding_content_does_not_matter(encoder_model):
    family, _, model = encoder_model
    batch = batch_for(family)
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = noisy["attention_mask"] == 0
    g = torch.Generator().manual_seed(7)
    noisy["input_ids"][pad] = torch.randint(5, VOCAB, (int(pad.sum()),), generator=g)
    if "token_type_ids" in noisy:
        noisy["token_type_ids"][pad] = 1
    assert not torch.equal(noisy["input_ids"], batch["input_ids"])
    policy = ew.get_policy("patience", patience=1)
    a, b = model.early_exit(policy, **batch), model.early_exit(policy, **noisy)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        model.full_depth(**batch), model.full_depth(**noisy), atol=ATOL, rtol=0
    )


def test_token_type_ids_are_honoured(encoder_model):
    family, encoder, model = encoder_model
    if int(getattr(encoder.config, "type_vocab_size", 0) or 0) < 2:
        pytest.skip(f"{family} has no segment embeddings")
    batch = batch_for(family)
    plain = {k: v for k, v in batch.items() if k != "token_type_ids"}
    with torch.no_grad():
        with_types = model(**batch).stacked()
        without = model(**plain).stacked()
    assert (with_types - without).abs().max() > 1e-4, "token_type_ids were ignored"
    # ... and honoured the same way the backbone's own forward honours them (never-exit test
    # covers the batch with segments); the executor sees them too:
    res = model.early_exit(ew.get_policy("never"), **batch)
    torch.testing.assert_close(res.logits, with_types[:, -1], atol=ATOL, rtol=0)


def test_distilbert_ignores_token_type_ids():
    # DistilBERT has no segment embeddings; its tokenizer still may emit token_type_ids.
    model = ew.attach_exits(tiny_encoder("distilbert"), layers="all", num_labels=2)
    batch = batch_for("distilbert", token_types=False)
    typed = {**batch, "token_type_ids": torch.ones_like(batch["input_ids"])}
    torch.testing.assert_close(model.full_depth(**batch), model.full_depth(**typed))


def test_albert_shares_layer_weights():
    backbone = ew.HFEncoderBackbone(tiny_encoder("albert"))
    assert backbone.num_layers == 4 and backbone.num_groups == 2
    # 4 layers over 2 groups: depths 0,1 use group 0 and depths 2,3 use group 1.
    assert backbone.block(0) is backbone.block(1)
    assert backbone.block(2) is backbone.block(3)
    assert backbone.block(1) is not backbone.block(2)


def test_single_row_and_unpadded_batch():
    # No attention_mask at all means every position is real.
    model = ew.attach_exits(tiny_encoder("bert"), layers=[2], num_labels=2).eval()
    ids = padded_batch((6, 6), seed=3)["input_ids"]
    a = model.full_depth(input_ids=ids)
    b = model.full_depth(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(a, b)
    assert model.exit_layers == [2, 4]


def test_a_misspelt_input_is_refused_not_ignored():
    # attention_masks (sic) once ran every row unmasked: padded rows changed silently
    from exitwise.errors import InputError

    model = ew.attach_exits(tiny_encoder("bert"), layers=[2], num_labels=2).eval()
    batch = padded_batch((6, 3), seed=1)
    typo = {"input_ids": batch["input_ids"], "attention_masks": batch["attention_mask"]}
    for call in (model.full_depth, model, lambda **b: model.early_exit(
            ew.get_policy("never"), **b)):
        with pytest.raises(InputError, match=r"unexpected inputs \['attention_masks'\]"):
            call(**typo)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_exits_placed_by_flops_on_every_encoder_family(family):
    # "flops:..." needed an example input the encoder adapter could not make
    model = ew.attach_exits(tiny_encoder(family),
                            ew.ExitConfig(layers="flops:0.3,0.6", head="mean", num_labels=2))
    # four blocks of equal cost after an embedding that costs no products: 0.3 of the FLOPs
    # is first reached after block 2 (0.5), 0.6 after block 3 (0.75); the final exit is added
    assert model.exit_layers == [2, 3, 4]

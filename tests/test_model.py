"""MultiExitModel: persistence (safetensors + JSON, no pickle), mode, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import ENCODER_FAMILIES, VOCAB, padded_batch, tiny_encoder
from torch import nn

import exitwise as ew
from exitwise.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    UnsupportedModelError,
)

PAD_ID = {"roberta": 1, "xlm-roberta": 1, "camembert": 1}
CALIBRATION = {
    "default": "entropy",
    "policies": {
        "entropy": {"policy": {"name": "entropy", "threshold": 0.35}, "target": 0.01},
        "patience": {"policy": {"name": "patience", "patience": 2}},
    },
}


def calibrated_model(family: str) -> ew.MultiExitModel:
    torch.manual_seed(0)
    model = ew.attach_exits(tiny_encoder(family), layers="every:2", head="mlp", num_labels=3)
    model.temperatures.copy_(torch.tensor([1.5, 0.75]))
    model.calibration = json.loads(json.dumps(CALIBRATION))
    return model


def no_pickles(folder: Path) -> None:
    bad = [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert not bad, f"pickled files written: {bad}"


def assert_same_heads(a: ew.MultiExitModel, b: ew.MultiExitModel) -> None:
    sa, sb = a.heads.state_dict(), b.heads.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert torch.equal(a.temperatures, b.temperatures)


# -- mode -------------------------------------------------------------------------------------
def test_attach_follows_backbone_mode_and_load_is_eval(tmp_path):
    model = ew.attach_exits(tiny_encoder("bert"), num_labels=2)  # tiny_encoder is in eval mode
    assert not model.training and not any(h.training for h in model.heads)
    train_mode = ew.attach_exits(tiny_encoder("bert").train(), num_labels=2)
    assert train_mode.training and all(h.training for h in train_mode.heads)
    train_mode.save_pretrained(tmp_path)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=tiny_encoder("bert").train())
    assert not loaded.training


# -- save / load ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model = calibrated_model(family)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "exit_config.json", "exit_heads.safetensors",
    ]
    meta = json.loads((tmp_path / "exit_config.json").read_text())
    assert meta["exit_layers"] == [2, 4] and meta["backbone_saved"] is False

    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=model.backbone.model)
    assert loaded.exit_layers == model.exit_layers
    assert [type(h) for h in loaded.heads] == [type(h) for h in model.heads]
    assert_same_heads(model, loaded)
    assert loaded.calibration == CALIBRATION
    assert loaded.calibrated_policy().to_dict() == {"name": "entropy", "threshold": 0.35}
    assert loaded.calibrated_policy("patience").to_dict() == {"name": "patience", "patience": 2,
                                                            "tolerance": 0.1}

    batch = padded_batch(pad_id=PAD_ID.get(family, 0))
    a = model.eval().early_exit(None, **batch)  # None = the calibrated default policy
    b = loaded.early_exit(None, **batch)
    assert torch.equal(a.exit_index, b.exit_index)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_save_with_backbone_reloads_without_argument(family, tmp_path):
    model = calibrated_model(family).eval()
    model.save_pretrained(tmp_path, save_backbone=True)
    saved = tmp_path / "backbone"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    no_pickles(tmp_path)

    loaded = ew.MultiExitModel.from_pretrained(tmp_path)
    assert loaded.backbone_tuned and loaded.backbone.model_type == model.backbone.model_type
    assert_same_heads(model, loaded)
    batch = padded_batch(pad_id=PAD_ID.get(family, 0))
    with torch.no_grad():
        for x, y in zip(model(**batch).logits, loaded(**batch).logits):
            assert torch.equal(x, y)
    assert torch.equal(model.full_depth(**batch), loaded.full_depth(**batch))


@pytest.mark.parametrize("family", [*ENCODER_FAMILIES, "llama", "task"])
def test_a_fine_tuned_backbone_loads_into_the_instance_given(family, tmp_path):
    # from_pretrained(dir, backbone=fresh instance) once kept the fresh weights and dropped
    # the fine-tuned ones the folder holds (and marked them tuned, so a re-save lied)
    from helpers.lmkit import tiny_lm

    def fresh():
        if family == "llama":
            return tiny_lm("llama", layers=3)
        if family == "task":
            torch.manual_seed(0)
            return tf.BertForSequenceClassification(tf.BertConfig(
                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, num_labels=3)).eval()
        return tiny_encoder(family)

    options = {"head": "lm"} if family == "llama" else {
        "num_labels": None if family == "task" else 2}
    model = ew.attach_exits(fresh(), layers=[1], **options).eval()
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the "fine-tuning"
    model.backbone_tuned = True
    model.save_pretrained(tmp_path)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=fresh())
    if family == "llama":
        batch = {"input_ids": torch.randint(0, 50, (2, 5))}
    else:
        batch = padded_batch(pad_id=PAD_ID.get(family, 0))
    with torch.no_grad():
        for x, y in zip(model(**batch).logits, loaded(**batch).logits):
            assert torch.equal(x, y)
    if family == "task":  # the same encoder without the classifier the folder holds
        bare = tf.BertModel(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64))
        with pytest.raises(CheckpointError, match="does not fit the fine-tuned one"):
            ew.MultiExitModel.from_pretrained(tmp_path, backbone=bare)


def test_backbone_tuned_flag_saves_backbone(tmp_path):
    model = calibrated_model("bert")
    model.backbone_tuned = True
    model.save_pretrained(tmp_path)
    assert (tmp_path / "backbone" / "model.safetensors").is_file()


def bert(**over) -> nn.Module:
    cfg = {
        "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
    }
    return tf.BertModel(tf.BertConfig(**{**cfg, **over})).eval()


@pytest.mark.parametrize(
    "other, key",
    [
        (lambda: bert(hidden_size=48), "hidden_size"),
        (lambda: bert(num_hidden_layers=2), "num_layers"),
        (lambda: tiny_encoder("roberta"), "model_type"),
    ],
    ids=["hidden-size", "num-layers", "model-type"],
)
def test_load_into_other_backbone_fails_clearly(tmp_path, other, key):
    calibrated_model("bert").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=key) as err:
        ew.MultiExitModel.from_pretrained(tmp_path, backbone=other())
    assert "saved for a backbone" in str(err.value)


def test_load_missing_or_unnamed_backbone(tmp_path):
    with pytest.raises(CheckpointError, match="not an exitwise model directory"):
        ew.MultiExitModel.from_pretrained(tmp_path / "nowhere")
    calibrated_model("bert").save_pretrained(tmp_path)  # no backbone saved, no name recorded
    with pytest.raises(CheckpointError, match="backbone="):
        ew.MultiExitModel.from_pretrained(tmp_path)


def test_no_calibration_is_an_input_error():
    model = ew.attach_exits(tiny_encoder("bert"), num_labels=2)
    with pytest.raises(InputError, match="calibrat"):
        model.early_exit(None, **padded_batch())
    model.calibration = json.loads(json.dumps(CALIBRATION))
    with pytest.raises(InputError, match="entropy, patience"):
        model.calibrated_policy("budget")


# -- unsupported models -----------------------------------------------------------------------
class MadeUpConfig(tf.PretrainedConfig):
    model_type = "made-up-encoder"


class MadeUpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = MadeUpConfig()
        self.layer = nn.Linear(4, 4)


def test_unknown_model_type_lists_supported_types():
    with pytest.raises(UnsupportedModelError) as err:
        ew.attach_exits(MadeUpModel(), num_labels=2)
    msg = str(err.value)
    assert "made-up-encoder" in msg
    for family in ENCODER_FAMILIES:
        assert family in msg


def test_gpt2_is_not_an_encoder():
    gpt2 = tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*bert"):
        ew.HFEncoderBackbone(gpt2)


def test_module_without_adapter():
    with pytest.raises(UnsupportedModelError, match="Linear"):
        ew.attach_exits(nn.Linear(3, 3), num_labels=2)


def test_task_model_uses_its_base_encoder():
    task = tf.BertForSequenceClassification(tiny_encoder("bert").config).eval()
    model = ew.attach_exits(task, num_labels=2)
    assert model.backbone.model is task.bert


# -- bad configuration ------------------------------------------------------------------------
def test_out_of_range_exit_layer_lists_valid_range():
    with pytest.raises(ConfigError, match=r"\[0, 5\].*1\.\.4"):
        ew.attach_exits(tiny_encoder("bert"), layers=[0, 2, 5], num_labels=2)


def test_unknown_head_lists_registered_heads():
    with pytest.raises(ConfigError) as err:
        ew.attach_exits(tiny_encoder("bert"), head="no-such-head", num_labels=2)
    for name in ew.HEADS.names():
        assert name in str(err.value)


def test_bad_head_options():
    with pytest.raises(ConfigError, match="mlp"):
        ew.attach_exits(tiny_encoder("bert"), head="mlp", head_kwargs={"bogus": 1}, num_labels=2)
    with pytest.raises(ConfigError, match="dropout"):
        ew.attach_exits(tiny_encoder("bert"), dropout=1.0, num_labels=2)


def test_config_and_keywords_together():
    with pytest.raises(InputError):
        ew.attach_exits(tiny_encoder("bert"), ew.ExitConfig(), num_labels=2)


# -- bad input --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_model():
    return ew.attach_exits(tiny_encoder("bert"), layers="all", num_labels=3)


def all_entry_points(model, **batch):
    """Every way to run the model; each must reject bad input the same way."""
    yield lambda: model(**batch)
    yield lambda: model.early_exit(ew.get_policy("never"), **batch)
    yield lambda: model.full_depth(**batch)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.zeros(3, 0, dtype=torch.long)}, "empty"),
        ({"input_ids": torch.tensor([5, 6, 7])}, "batch, seq_len"),
        ({"input_ids": torch.full((2, 4), VOCAB)}, "vocabulary"),
        ({"input_ids": torch.full((2, 4), -100)}, "negative"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long),
          "attention_mask": torch.ones(2, 5, dtype=torch.long)}, "attention_mask"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long),
          "attention_mask": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])}, "all zeros"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long),
          "token_type_ids": torch.full((2, 4), 2)}, "token_type_ids"),
        ({"attention_mask": torch.ones(2, 4, dtype=torch.long)}, "input_ids"),
    ],
    ids=["empty-batch", "empty-seq", "1d", "id-too-big", "negative-id", "mask-shape",
         "empty-row", "token-type", "no-ids"],
)
def test_bad_batches_raise_input_error(bert_model, bad, match):
    for run in all_entry_points(bert_model, **bad):
        with pytest.raises(InputError, match=match):
            run()


def test_check_labels(bert_model):
    ok = bert_model.check_labels(torch.tensor([0, 2, 1]), 3)
    assert ok.tolist() == [0, 2, 1]
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        bert_model.check_labels(torch.tensor([0, 3]), 2)
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        bert_model.check_labels(torch.tensor([-1, 0]))
    with pytest.raises(InputError, match="2 labels for a batch of 3"):
        bert_model.check_labels(torch.tensor([0, 1]), 3)
    with pytest.raises(InputError, match=r"\(batch,\)"):
        bert_model.check_labels(torch.zeros(2, 3, dtype=torch.long))


def test_labels_checked_by_the_executor(bert_model):
    batch = padded_batch((4, 3))
    with pytest.raises(InputError, match="needs labels"):
        bert_model.early_exit(ew.get_policy("oracle"), **batch)
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        bert_model.early_exit(ew.get_policy("oracle"), labels=torch.tensor([0, 7]), **batch)
    # A collated batch carries its labels: the oracle uses them, and they are validated for
    # every policy (a label out of range is a data bug wherever it shows up).
    with_labels = {**batch, "labels": torch.tensor([0, 1])}
    assert bert_model.early_exit(ew.get_policy("oracle"), **with_labels).exit_index.shape == (2,)
    never = bert_model.early_exit(ew.get_policy("never"), **with_labels)
    assert never.exit_index.tolist() == [3, 3]
    with pytest.raises(InputError):
        bert_model.early_exit(ew.get_policy("never"), **{**batch, "labels": torch.tensor([0, 9])})


def test_heterogeneous_exits_build_save_and_load(tmp_path):
    """LGViT-style: different head kinds per exit, kept through save/load."""
    cfg = ew.ExitConfig(layers="all", head={1: "linear", 2: "mlp", 3: "mean", 4: "pooler"},
                        head_kwargs={2: {"hidden_features": 16}}, num_labels=3)
    model = ew.attach_exits(tiny_encoder("bert"), cfg)
    names = [type(h).registered_name for h in model.heads]
    assert names == ["linear", "mlp", "mean", "pooler"]
    assert model.heads[1].fc1.out_features == 16
    model.save_pretrained(tmp_path)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=model.backbone.model)
    assert [type(h).registered_name for h in loaded.heads] == names
    assert_same_heads(model, loaded)


@pytest.mark.parametrize("head", ["linear", "mean", "pooler", "mlp", "fastbert", "smartbert"])
def test_fresh_heads_follow_the_backbone_precision(head):
    # heads were built float32 beside a bf16 backbone: the first forward failed in a matmul
    backbone = bert().to(torch.bfloat16)
    model = ew.attach_exits(backbone, layers="all", head=head, num_labels=3).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.heads.parameters())
    assert model.temperatures.dtype == torch.float32
    ids = torch.randint(5, VOCAB, (2, 6))
    with torch.no_grad():
        every = model(input_ids=ids).logits
        res = model.early_exit(ew.get_policy("never"), input_ids=ids)
        full = model.full_depth(input_ids=ids)  # the HF forward's own rounding in bf16
    assert every[-1].dtype == torch.bfloat16 and torch.equal(res.logits, every[-1])
    torch.testing.assert_close(full, every[-1], atol=2e-2, rtol=2e-2)


def test_early_exit_refuses_what_is_not_a_policy():
    # a dict or a policy class failed with an AttributeError deep in the executor
    model = ew.attach_exits(bert(), layers=[2], num_labels=2).eval()
    ids = torch.randint(5, VOCAB, (2, 6))
    with pytest.raises(ConfigError, match="policy_from_dict"):
        model.early_exit({"name": "entropy", "threshold": 0.3}, input_ids=ids)
    with pytest.raises(ConfigError, match="got type"):
        model.early_exit(type(ew.get_policy("entropy")), input_ids=ids)


def test_loading_onto_a_backbone_with_other_weights_is_flagged(tmp_path):
    # heads saved for one checkpoint loaded silently onto another of the same architecture
    import warnings

    def seeded(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return bert()

    model = ew.attach_exits(seeded(), layers=[2], num_labels=2).eval()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same weights, also in bf16: no warning
        ew.MultiExitModel.from_pretrained(tmp_path, backbone=seeded())
        ew.MultiExitModel.from_pretrained(tmp_path, backbone=seeded().to(torch.bfloat16))
    with pytest.warns(UserWarning, match="not the ones the exit heads"):
        ew.MultiExitModel.from_pretrained(tmp_path, backbone=seeded(123))

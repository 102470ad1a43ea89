"""A model's own classifier survives ``attach_exits`` as the final exit (head ``native``):
never-exit output == the model's own logits, bit for bit at full depth, for every encoder
family's ``*ForSequenceClassification``, every vision family (tests/backbones) and a sequential
network with a classifier; saved and loaded back; frozen-backbone recipes leave it as it is."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from conftest import ENCODER_FAMILIES, padded_batch, tiny_encoder
from torch import nn

import exitwise as ew
from exitwise.backbones import SequentialBackbone
from exitwise.errors import ConfigError

PAD_ID = {"roberta": 1, "xlm-roberta": 1, "camembert": 1}
LABELS = ["negative", "neutral", "positive"]


def task_model(family: str, seed: int = 0) -> nn.Module:
    """The family's ``*ForSequenceClassification`` (3 named classes) around a tiny encoder."""
    config = copy.deepcopy(tiny_encoder(family, seed).config)
    config.num_labels = 3
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {n: i for i, n in enumerate(LABELS)}
    torch.manual_seed(seed)
    return tf.AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_encoder_task_models_keep_their_classifier(family, tmp_path):
    raw = task_model(family)
    model = ew.attach_exits(raw, layers="every:2", head="mean").eval()
    assert type(model.heads[-1]).registered_name == "native"
    assert model.num_labels == 3 and model.config.label_names == LABELS
    batch = padded_batch(pad_id=PAD_ID.get(family, 0))
    with torch.no_grad():
        own = raw(**batch).logits
    assert torch.equal(model.full_depth(**batch), own)  # the model's own forward + classifier
    res = model.early_exit(ew.get_policy("never"), **batch)
    torch.testing.assert_close(res.logits, own, atol=1e-5, rtol=1e-5)  # stepped, same layers
    # shared, not copied: the final exit's parameters are the task model's
    ids = {id(p) for p in model.heads[-1].parameters()}
    assert id(raw.classifier.parameters().__next__()) in ids

    model.save_pretrained(tmp_path, save_backbone=True)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path)
    assert type(loaded.backbone.task_model).__name__ == type(raw).__name__
    assert torch.equal(loaded.full_depth(**batch), own)
    for (k, a), b in zip(model.heads.state_dict().items(), loaded.heads.state_dict().values()):
        assert torch.equal(a, b), k


def test_own_classifier_choices_an_explicit_head_or_another_class_count_replace_it():
    raw = task_model("bert")
    fresh = ew.attach_exits(raw, layers="all", head="mean", final_head="linear")
    assert type(fresh.heads[-1]).registered_name == "linear"
    other = ew.attach_exits(raw, layers="all", head="mean", num_labels=5)
    assert type(other.heads[-1]).registered_name == "mean" and other.num_labels == 5
    listed = ew.attach_exits(raw, layers=[2, 4], head=["mean", "pooler"])
    assert type(listed.heads[-1]).registered_name == "pooler"
    # a head of the user's own choosing still serves the network's task: its 3 named classes
    mapped = ew.attach_exits(raw, layers=[2, 4], head={2: "mean", 4: "linear"})
    for model in (fresh, listed, mapped):
        assert model.num_labels == 3 and model.config.label_names == LABELS
        assert model.heads[-1](torch.randn(2, 5, 32), None).shape[-1] == 3
    with pytest.raises(ConfigError, match="has none"):
        ew.attach_exits(tiny_encoder("bert"), layers="all", head="mean", final_head="native")
    # names that are not the classifier's by id would silently name its rows wrong (an
    # ImageFolder's sorted class names beside a checkpoint's own order)
    same = ew.attach_exits(raw, layers="all", head="mean", label_names=LABELS)
    assert type(same.heads[-1]).registered_name == "native"
    for names, how in ((sorted(LABELS, reverse=True), "in another order"),
                       (["cat", "dog", "fox"], "not its classes")):
        with pytest.raises(ConfigError, match=how):
            ew.attach_exits(raw, layers="all", head="mean", label_names=names)
    renamed = ew.attach_exits(raw, layers="all", head="mean", label_names=["cat", "dog", "fox"],
                              final_head="linear")
    assert renamed.config.label_names == ["cat", "dog", "fox"]


def test_a_sequential_network_with_a_classifier():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)]
    classifier = nn.Linear(8, 4)
    bb = SequentialBackbone(blocks, classifier=classifier, example=torch.randn(1, 8))
    model = ew.attach_exits(bb, layers="all", head="linear").eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        own = classifier(blocks[2](blocks[1](blocks[0](x))))
    assert model.num_labels == 4
    assert torch.equal(model.full_depth(pixel_values=x), own)
    assert torch.equal(model.early_exit(ew.get_policy("never"), pixel_values=x).logits, own)


def test_frozen_backbone_recipes_leave_the_own_classifier_as_it_is(tmp_path):
    """sdn_ic_only trains the internal classifiers of a frozen network: its own classifier,
    the final exit, stays the model's, so full depth is still the model's own output."""
    from exitwise.training import train

    raw = task_model("bert")
    before = {k: v.clone() for k, v in raw.classifier.state_dict().items()}
    model = ew.attach_exits(raw, layers="all", head="mean", dropout=0.0)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(5, 99, (6,), generator=g).tolist(),
             "labels": int(i % 3)} for i in range(16)]
    train(model, data, strategy="sdn_ic_only", output_dir=str(tmp_path), max_steps=2,
          per_device_train_batch_size=8, learning_rate=1e-2, use_cpu=True, disable_tqdm=True)
    after = raw.classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    batch = padded_batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.full_depth(**batch), raw(**batch).logits)

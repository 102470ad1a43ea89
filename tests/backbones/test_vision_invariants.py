"""DESIGN.md invariants for every vision family in the layout table.

Tiny random models built in memory (no weights, no network), 32x32 images:
- never-exit == the model's own pre-logits features + the final head; a model with its own
  classifier keeps it as the final exit, so never-exit == the model's own logits;
- per-row exits == each row run alone;
- offline replay on a cache from ``collect_exit_logits`` == the real executor;
- saved exit heads load back bit-identical (``backbone=`` given).

The builders are in ``helpers/vision.py``, shared with the other vision tests.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import exitwise as ew
from exitwise.analysis import collect_exit_logits, replay
from exitwise.backbones import VisionBackbone
from exitwise.policies.entropy import prediction_entropy

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from helpers.vision import CLASSES, FAMILIES, SIZE, images, tiny_vision  # noqa: E402

ATOL = 1e-5


def own_features(family: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's pre-logits features from its own code, without any exitwise adapter."""
    with torch.no_grad():
        if family.startswith("timm"):
            return model.forward_head(model.forward_features(x), pre_logits=True)
        if family == "hf-vit":
            return model.vit(pixel_values=x).last_hidden_state[:, 0]
        headless = copy.deepcopy(model)
        if family == "tv-resnet":
            headless.fc = nn.Identity()
        else:
            headless.classifier = nn.Identity()
        return headless(x)


@functools.lru_cache(maxsize=None)
def built(family: str, head: str = "linear"):
    """(raw model, multi-exit model with spread-out random exits; the final exit is the raw
    model's own classifier, which is left as it is)."""
    raw = tiny_vision(family)
    torch.manual_seed(1)
    model = ew.attach_exits(VisionBackbone(raw, image_size=SIZE),
                            ew.ExitConfig(layers="all", head=head, dropout=0.0))
    assert type(model.heads[-1]).registered_name == "native"
    with torch.no_grad():  # larger weights: random exits disagree, confidences spread out
        for h in model.heads[:-1]:
            h.classifier.weight.mul_(20.0)
    return raw, model.eval()


def split_threshold(values: torch.Tensor) -> float:
    """A threshold in the widest gap among the middle sorted values (stable decisions)."""
    v = values.sort().values
    gaps = v[2:-1] - v[1:-2]
    j = int(gaps.argmax()) + 1
    return float((v[j] + v[j + 1]) / 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_never_exit_equals_own_features_and_logits(family):
    raw, model = built(family)
    x = images()
    own = own_features(family, raw, x)
    expected = model.heads[-1](own)
    res = model.early_exit(ew.get_policy("never"), pixel_values=x)
    assert res.exit_index.tolist() == [model.num_exits - 1] * len(x)
    torch.testing.assert_close(res.logits, expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(model.full_depth(pixel_values=x), expected, atol=ATOL, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits[-1], expected, atol=ATOL, rtol=1e-5)

    # the model's own classifier is the final exit: never-exit == the model's own logits,
    # bit for bit at full depth (the model's own forward, its own classifier)
    with torch.no_grad():
        out = raw(x)
    own_logits = out.logits if hasattr(out, "logits") else out
    assert model.num_labels == CLASSES
    assert torch.equal(model.full_depth(pixel_values=x), own_logits)
    torch.testing.assert_close(res.logits, own_logits, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_exits_equal_rows_alone(family):
    _, model = built(family)
    x = images()
    with torch.no_grad():
        ent = prediction_entropy(model(pixel_values=x).logits[0])
    policy = ew.get_policy("entropy", threshold=split_threshold(ent))
    res = model.early_exit(policy, pixel_values=x)
    assert len(set(res.exit_index.tolist())) >= 2
    assert res.rows_per_layer[0] == len(x) and res.rows_per_layer[-1] < len(x)
    for r in range(len(x)):
        alone = model.early_exit(policy, pixel_values=x[r : r + 1])
        assert int(alone.exit_index) == int(res.exit_index[r])
        assert int(alone.predictions) == int(res.predictions[r])
        torch.testing.assert_close(alone.logits[0], res.logits[r], atol=ATOL, rtol=1e-5)
        assert float(alone.flops) == float(res.flops[r])


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_equals_runtime(family):
    _, model = built(family)
    x, y = images(9, seed=4), torch.arange(9) % CLASSES
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    cache = collect_exit_logits(model, loader, progress=False)
    assert cache.logits.shape == (9, model.num_exits, CLASSES)
    assert bool((cache.costs.diff(dim=1) > 0).all())  # deeper exits cost more
    conf = cache.logits[:, 0].softmax(-1).amax(-1)
    mixed = ew.get_policy("confidence", threshold=split_threshold(conf))
    for policy in (mixed, ew.get_policy("patience", patience=2)):
        live = model.early_exit(policy, pixel_values=x)
        offline = replay(policy, cache)
        assert torch.equal(offline.exit_index, live.exit_index), policy.registered_name
        assert torch.equal(offline.predictions, live.predictions)
        assert torch.equal(offline.costs, live.flops)
        if policy is mixed:  # not vacuous: some rows leave early, some run to the end
            assert (live.exit_index == 0).any() and (live.exit_index > 0).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    raw = tiny_vision(family)
    head = "vit_layer" if family.endswith("vit") else "sdn"
    config = ew.ExitConfig(layers="flops:0.3,0.6", head=head, final_head="linear",
                           num_labels=CLASSES, dropout=0.0)
    model = ew.attach_exits(VisionBackbone(raw, image_size=SIZE), config).eval()
    model.temperatures.fill_(1.5)
    model.save_pretrained(tmp_path)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["exit_config.json", "exit_heads.safetensors"]
    again = VisionBackbone(raw, image_size=SIZE)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=again)
    assert loaded.exit_layers == model.exit_layers and len(model.exit_layers) >= 2
    for (k, a), b in zip(model.heads.state_dict().items(), loaded.heads.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(loaded.temperatures, model.temperatures)
    x = images(4)
    policy = ew.get_policy("confidence", threshold=0.5)
    a, b = model.early_exit(policy, pixel_values=x), loaded.early_exit(policy, pixel_values=x)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    with pytest.raises(ew.CheckpointError, match="backbone="):
        ew.MultiExitModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["timm-resnet", "hf-vit"])
def test_tuned_backbone_round_trip(family, tmp_path):
    raw, model = built(family)
    model.save_pretrained(tmp_path, save_backbone=True)
    assert (tmp_path / "backbone.safetensors").is_file()
    fresh = VisionBackbone(tiny_vision(family, seed=7), image_size=SIZE)  # other weights
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=fresh)
    x = images(3)
    torch.testing.assert_close(loaded.full_depth(pixel_values=x), model.full_depth(pixel_values=x), atol=0, rtol=0)


def test_heads_saved_for_one_family_do_not_load_into_another(tmp_path):
    _, model = built("timm-resnet")
    model.save_pretrained(tmp_path)
    with pytest.raises(ew.CheckpointError, match="model_type"):
        ew.MultiExitModel.from_pretrained(
            tmp_path, backbone=VisionBackbone(tiny_vision("tv-resnet"), image_size=SIZE)
        )


def test_heads_saved_for_rgb_do_not_load_into_a_one_channel_model(tmp_path):
    # the same architecture built with in_chans=1 loaded with only the "other weights" warning
    _, model = built("timm-resnet")
    model.save_pretrained(tmp_path)
    gray = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES, in_chans=1)
    with pytest.raises(ew.CheckpointError, match="in_channels=3"):
        ew.MultiExitModel.from_pretrained(tmp_path, backbone=VisionBackbone(gray.eval(),
                                                                            image_size=SIZE))


def test_a_bare_hf_vit_gets_a_fresh_final_head_and_keeps_the_invariants(tmp_path):
    # ViTModel (no classifier) was claimed but never built: the final exit is a fresh head
    # on the [CLS] state of the model's own forward
    import transformers as tf

    torch.manual_seed(0)
    raw = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                   intermediate_size=64, image_size=SIZE, patch_size=8),
                      add_pooling_layer=False).eval()
    model = ew.attach_exits(raw, ew.ExitConfig(layers="all", head="linear", num_labels=CLASSES,
                                               dropout=0.0)).eval()
    assert type(model.heads[-1]).registered_name == "linear"
    x = images()
    with torch.no_grad():
        own = model.heads[-1](raw(pixel_values=x).last_hidden_state[:, :1])
        for h in model.heads[:-1]:
            h.classifier.weight.mul_(20.0)
        first = model(pixel_values=x).logits[0]
    never = model.early_exit(ew.get_policy("never"), pixel_values=x)
    torch.testing.assert_close(never.logits, own, atol=ATOL, rtol=1e-5)
    policy = ew.get_policy("entropy", threshold=split_threshold(prediction_entropy(first)))
    res = model.early_exit(policy, pixel_values=x)
    assert len(set(res.exit_index.tolist())) >= 2
    for r in range(len(x)):
        alone = model.early_exit(policy, pixel_values=x[r : r + 1])
        assert int(alone.exit_index) == int(res.exit_index[r])
        torch.testing.assert_close(alone.logits[0], res.logits[r], atol=ATOL, rtol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=raw)
    assert torch.equal(loaded.early_exit(policy, pixel_values=x).logits, res.logits)

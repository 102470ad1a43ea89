"""The same invariants for ``nn.Sequential`` backbones: an MLP and a tiny CNN.

The CNN's exits read (B, C, H, W) feature maps; every head pools them over space to (B, C)
(the sequential adapter reports ``feature_dim`` = channels).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import exitwise as ew
from exitwise.errors import ConfigError, InputError
from exitwise.heads import heads_for_family, uses_past_states
from exitwise.policies.entropy import prediction_entropy

ATOL = 1e-5


def mlp_parts(seed: int = 0):
    torch.manual_seed(seed)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)])
    x = torch.randn(7, 8)
    return None, blocks, x


def cnn_parts(seed: int = 0):
    torch.manual_seed(seed)
    stem = nn.Conv2d(1, 4, 3, padding=1)
    blocks = nn.Sequential(
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU()),  # 8x8 -> 4x4, 6 ch
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()),
    )
    x = torch.randn(7, 1, 8, 8)
    return stem, blocks, x


PARTS = {"mlp": mlp_parts, "cnn": cnn_parts}


def build(kind: str, head: str = "linear", layers="all"):
    stem, blocks, x = PARTS[kind]()
    backbone = ew.SequentialBackbone(blocks, stem=stem, example=x[:1])
    torch.manual_seed(1)
    model = ew.attach_exits(backbone, ew.ExitConfig(layers=layers, head=head, num_labels=3))
    with torch.no_grad():  # spread the random exits' confidences
        for h in model.heads:
            for p in h.parameters():
                p.mul_(6.0)
    return stem, blocks, x, model.eval()


@pytest.fixture(params=sorted(PARTS))
def kind(request):
    return request.param


def plain_forward(stem, blocks, x):
    with torch.no_grad():
        return blocks(stem(x) if stem is not None else x)


def test_feature_dims_and_flops_profiled(kind):
    _, _, _, model = build(kind)
    widths = [model.backbone.feature_dim(d) for d in model.exit_layers]
    assert widths == ([8, 8, 8, 8] if kind == "mlp" else [4, 6, 6])
    state = model.backbone.start(inputs=PARTS[kind]()[2][:2])
    assert all(float(model.backbone.layer_flops(i, state)[0]) > 0
               for i in range(model.backbone.num_layers))


def test_flops_follow_the_input_size():
    """Profiled on 8x8, run on 16x16: each row's FLOPs are the 16x16 network's (torch's own
    counter on the plain network), not the example's (a convolution costs 4x as much)."""
    from torch.utils.flop_counter import FlopCounterMode

    stem, blocks, _, model = build("cnn", head="linear")

    def reference(size: int) -> int:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            plain_forward(stem, blocks, torch.randn(1, 1, size, size))
        return counter.get_total_flops()

    for size in (8, 16, 8):
        res = model.early_exit(ew.get_policy("never"), inputs=torch.randn(3, 1, size, size))
        heads = sum(float(h.head_flops(None, 1)) for h in model.heads)  # linear: per row
        assert res.flops.tolist() == pytest.approx([reference(size) + heads] * 3)
    assert reference(16) == 4 * reference(8)


@pytest.mark.parametrize("head", heads_for_family("sequential"))
def test_never_exit_equals_sequential_forward(kind, head):
    if kind == "cnn" and uses_past_states(ew.heads.HEADS.get(head)):
        # the CNN's exits are 4 and 6 channels wide: refused when the exits are attached
        with pytest.raises(ConfigError, match="one feature width"):
            build(kind, head)
        return
    stem, blocks, x, model = build(kind, head)
    if uses_past_states(model.heads[-1]):
        # a head that reads the earlier exits' states has no standalone output: the model's
        # forward over the plain blocks is the reference
        with torch.no_grad():
            expected = model(pixel_values=x).logits[-1]
    else:
        expected = model.heads[-1](plain_forward(stem, blocks, x))
    res = model.early_exit(ew.get_policy("never"), pixel_values=x)
    assert res.exit_index.tolist() == [model.num_exits - 1] * len(x)
    torch.testing.assert_close(res.logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(model.full_depth(pixel_values=x), expected, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits[-1], expected, atol=ATOL, rtol=0)


def test_per_row_exits_equal_rows_alone(kind):
    _, _, x, model = build(kind)
    with torch.no_grad():
        ent = prediction_entropy(model(pixel_values=x).logits[0]).sort().values
    k = (len(ent) - 1) // 2
    policy = ew.get_policy("entropy", threshold=float((ent[k] + ent[k + 1]) / 2))
    res = model.early_exit(policy, pixel_values=x)
    assert len(set(res.exit_index.tolist())) >= 2
    for r in range(len(x)):
        alone = model.early_exit(policy, pixel_values=x[r : r + 1])
        assert int(alone.exit_index) == int(res.exit_index[r])
        assert int(alone.predictions) == int(res.predictions[r])
        torch.testing.assert_close(alone.logits[0], res.logits[r], atol=ATOL, rtol=0)
    # Rows really left: fewer rows entered the later blocks.
    assert res.rows_per_layer[0] == len(x)
    assert res.rows_per_layer[-1] < len(x)


def test_save_load_with_backbone_argument(kind, tmp_path):
    stem, blocks, x, model = build(kind, layers=[1])
    model.temperatures.fill_(1.25)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "exit_config.json", "exit_heads.safetensors",
    ]
    backbone = ew.SequentialBackbone(blocks, stem=stem, example=x[:1])
    loaded = ew.MultiExitModel.from_pretrained(tmp_path, backbone=backbone)
    assert loaded.exit_layers == model.exit_layers
    for a, b in zip(model.heads.state_dict().values(), loaded.heads.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(loaded.temperatures, model.temperatures)
    policy = ew.get_policy("confidence", threshold=0.7)
    a, b = model.early_exit(policy, pixel_values=x), loaded.early_exit(policy, pixel_values=x)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_save_load_tuned_sequential_backbone(tmp_path):
    # A "tuned" generic backbone is saved as safetensors and restored into the one given.
    _, _, x, model = build("mlp")
    model.save_pretrained(tmp_path, save_backbone=True)
    assert (tmp_path / "backbone.safetensors").is_file()
    _, fresh_blocks, _ = mlp_parts(seed=5)  # same shapes, other weights
    loaded = ew.MultiExitModel.from_pretrained(
        tmp_path, backbone=ew.SequentialBackbone(fresh_blocks, example=x[:1])
    )
    torch.testing.assert_close(loaded.full_depth(pixel_values=x), model.full_depth(pixel_values=x), atol=0, rtol=0)


def test_load_needs_backbone_argument(tmp_path):
    _, _, _, model = build("mlp")
    model.save_pretrained(tmp_path)
    with pytest.raises(ew.CheckpointError, match="backbone="):
        ew.MultiExitModel.from_pretrained(tmp_path)


def test_load_into_wrong_width_fails_clearly(tmp_path):
    _, _, x, model = build("mlp")
    model.save_pretrained(tmp_path)
    wide = nn.Sequential(*[nn.Sequential(nn.Linear(8 if i == 0 else 16, 16)) for i in range(4)])
    with pytest.raises(ew.CheckpointError, match="do not fit"):
        ew.MultiExitModel.from_pretrained(
            tmp_path, backbone=ew.SequentialBackbone(wide, example=x[:1])
        )
    deeper = nn.Sequential(*[nn.Linear(8, 8) for _ in range(5)])
    with pytest.raises(ew.CheckpointError, match="num_layers"):
        ew.MultiExitModel.from_pretrained(
            tmp_path, backbone=ew.SequentialBackbone(deeper, example=x[:1])
        )


def test_plain_sequential_without_example_asks_for_one():
    with pytest.raises(ConfigError, match="example"):
        ew.attach_exits(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), num_labels=2)


def test_empty_sequential_batch_and_blocks():
    _, _, x, model = build("mlp")
    with pytest.raises(InputError, match="empty"):
        model.early_exit(ew.get_policy("never"), pixel_values=x[:0])
    with pytest.raises(ConfigError):
        ew.SequentialBackbone([])


def test_one_name_for_one_input():
    """Images are pixel_values everywhere (as Hugging Face names them); other keywords are
    refused with the name to use."""
    import pytest as _pytest

    from exitwise.backbones import SequentialBackbone
    from exitwise.errors import InputError

    model = ew.attach_exits(SequentialBackbone([torch.nn.Linear(4, 4)] * 2,
                                               example=torch.randn(1, 4)), head="linear")
    x = torch.randn(3, 4)
    assert model.early_exit(ew.get_policy("never"), pixel_values=x).logits.shape == (3, 2)
    assert model.early_exit(ew.get_policy("never"), inputs=x).logits.shape == (3, 2)
    with _pytest.raises(InputError, match="pixel_values"):
        model.early_exit(ew.get_policy("never"), x=x)

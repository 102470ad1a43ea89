"""ONNX export as exit segments: every segment equals eager, the onnxruntime early-exit runner
makes the eager executor's decisions.

One tiny CNN (nn.Sequential of conv blocks, SDN heads, a cascade final head that reads the
previous exit's logits) is exported once per module: the torch.export-based exporter takes a
couple of seconds per segment.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import exitwise as ew
from exitwise.backbones.base import Backbone, BackboneState
from exitwise.errors import InputError, UnsupportedModelError
from exitwise.runtime.export import OnnxExitRunner, export_segments, segments_of

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CLASSES, ATOL = 4, 1e-4


def tiny_cnn() -> ew.MultiExitModel:
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1), nn.BatchNorm2d(6),
                      nn.ReLU())
        for i in range(3)
    ]
    stem = nn.Conv2d(3, 3, 1)
    backbone = ew.SequentialBackbone(blocks, stem=stem, example=torch.randn(1, 3, 8, 8))
    config = ew.ExitConfig(layers="all", head="sdn", final_head="cascade", num_labels=CLASSES,
                           dropout=0.0, head_kwargs={"pool_size": 2},
                           final_head_kwargs={"base_kwargs": {"pool_size": 2}})
    model = ew.attach_exits(backbone, config)
    with torch.no_grad():  # non-trivial BatchNorm statistics and spread-out confidences
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        for h in model.heads:
            layer = getattr(h, "classifier", None) or h.base.classifier
            layer.weight.mul_(6.0)
        model.heads[-1].previous.weight.normal_(0.0, 0.5)  # make the cascade input matter
    model.temperatures.copy_(torch.tensor([1.5, 0.8, 1.0]))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_cnn()
    folder = tmp_path_factory.mktemp("onnx")
    export_segments(model, folder, torch.randn(2, 3, 8, 8))
    return model, folder, OnnxExitRunner(folder)


def images(n: int = 9, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_manifest_and_files(exported):
    model, folder, runner = exported
    manifest = json.loads((folder / "segments.json").read_text())
    assert manifest["exit_layers"] == model.exit_layers == [1, 2, 3]
    assert manifest["input_shape"] == [3, 8, 8]
    assert manifest["temperatures"] == pytest.approx([1.5, 0.8, 1.0])
    assert [s["blocks"] for s in manifest["segments"]] == [[0, 1], [1, 2], [2, 3]]
    # Only the cascade head reads the previous exit's logits.
    assert [s["inputs"] for s in manifest["segments"]] == [
        ["features"], ["features"], ["features", "previous_logits"]]
    for seg in manifest["segments"]:
        assert (folder / seg["file"]).is_file()


def test_every_segment_equals_eager(exported):
    model, _, runner = exported
    x = images(n=7)  # not the export batch size: the batch is dynamic
    with torch.inference_mode():
        eager = model(pixel_values=x).stacked()
    onnx = runner.all_exits(x)
    assert onnx.shape == eager.shape == (7, 3, CLASSES)
    torch.testing.assert_close(onnx, eager, atol=ATOL, rtol=1e-4)
    # Each segment alone, fed eager features, gives eager features and logits.
    feats, prev = x, None
    for seg, sess in zip(segments_of(model), runner.sessions):
        with torch.inference_mode():
            want_f, want_l = seg(*((feats, prev) if seg.takes_previous else (feats,)))
        feeds = {"features": feats.numpy()}
        if seg.takes_previous:
            feeds["previous_logits"] = prev.numpy()
        got_f, got_l = sess.run(None, feeds)
        torch.testing.assert_close(torch.from_numpy(got_f), want_f, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(got_l), want_l, atol=ATOL, rtol=1e-4)
        feats, prev = want_f, want_l


def _mixed_threshold(model, x) -> float:
    """A confidence threshold in a wide gap of exit 0's confidences, so that decisions are
    mixed and cannot flip under float round-off between ONNX and eager."""
    with torch.inference_mode():
        logits = model(pixel_values=x).logits[0] / model.temperatures[0]
    conf = torch.softmax(logits, -1).amax(-1).sort().values
    gaps = conf[2:-2].diff()
    j = int(gaps.argmax()) + 2
    assert float(gaps.max()) > 1e-3
    return float((conf[j] + conf[j + 1]) / 2)


@pytest.mark.parametrize("name", ["confidence", "ztw", "window", "patience"])
def test_runner_decisions_equal_the_eager_executor(exported, name):
    model, _, runner = exported
    x = images(n=16, seed=7)
    if name in ("confidence", "ztw"):
        policy = ew.get_policy(name, threshold=_mixed_threshold(model, x))
    elif name == "window":
        policy = ew.get_policy("window", low=0.35, high=0.9)
    else:
        policy = ew.get_policy("patience", patience=1)
    live = model.early_exit(policy, pixel_values=x)
    onnx = runner.run(x, policy)
    assert torch.equal(onnx.exit_index, live.exit_index)
    assert torch.equal(onnx.exit_layer, live.exit_layer)
    assert torch.equal(onnx.predictions, live.predictions)
    torch.testing.assert_close(onnx.logits, live.logits, atol=ATOL, rtol=1e-4)
    assert onnx.rows_per_segment[0] == 16
    if name == "confidence":  # the threshold was chosen to split the rows
        assert len(set(live.exit_index.tolist())) >= 2


def test_runner_drops_rows_that_exited(exported):
    model, _, runner = exported
    x = images(n=6)
    everyone = runner.run(x, ew.get_policy("confidence", threshold=0.0))
    assert everyone.exit_index.tolist() == [0] * 6 and everyone.rows_per_segment == [6]
    nobody = runner.run(x, ew.get_policy("never"))
    assert nobody.exit_index.tolist() == [2] * 6 and nobody.rows_per_segment == [6, 6, 6]


def test_runner_rejects_wrong_inputs(exported):
    _, folder, runner = exported
    with pytest.raises(InputError, match="exported for inputs"):
        runner.run(torch.randn(2, 3, 9, 9), ew.get_policy("confidence"))
    with pytest.raises(InputError, match="exported for inputs"):
        runner.all_exits(torch.randn(2, 1, 8, 8))
    with pytest.raises(InputError, match="not found"):
        OnnxExitRunner(folder / "nowhere")


class _TokenBackbone(Backbone):
    """A backbone of a family the exporter does not take (stands in for HF encoders)."""

    num_layers = 1
    family = "tokens"

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)

    def start(self, x=None, **inputs):
        return BackboneState(hidden=x)

    def step(self, i, state):
        state.hidden = self.block(state.hidden)
        return state

    def feature_dim(self, layer):
        return 4


def test_unsupported_backbone_is_a_clear_error(tmp_path):
    model = ew.attach_exits(_TokenBackbone(), ew.ExitConfig(num_labels=2, head="linear"))
    with pytest.raises(UnsupportedModelError, match="vision and nn.Sequential"):
        export_segments(model, tmp_path, torch.zeros(1, 4))


def test_heads_reading_earlier_exits_states_are_refused_up_front(tmp_path):
    # each segment hands on one state: past_future heads got none and failed deep in export
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 6)),
                            ew.ExitConfig(layers="all", head="past_future", num_labels=3))
    with pytest.raises(UnsupportedModelError, match="earlier exits' states"):
        segments_of(model)


@pytest.mark.parametrize("family, head, size", [
    ("timm-resnet", "sdn", 32), ("timm-vit", "vit_layer", 32),
    ("timm-resnet", "sdn", 56),  # maps of 14 x 14 and 7 x 7: not multiples of the 4 x 4 pool
])
def test_vision_backbones_export(tmp_path, family, head, size):
    """timm CNN (feature maps) and ViT (tokens with a mask): segments equal eager."""
    pytest.importorskip("timm")
    from helpers.vision import tiny_vision

    from exitwise.backbones import VisionBackbone

    backbone = VisionBackbone(tiny_vision(family), image_size=size)
    n = backbone.num_layers
    model = ew.attach_exits(backbone, ew.ExitConfig(layers=[1, n // 2, n], head=head,
                                                   num_labels=10, dropout=0.0)).eval()
    export_segments(model, tmp_path, torch.randn(2, 3, size, size))
    x = torch.randn(5, 3, size, size)
    with torch.inference_mode():
        eager = model(pixel_values=x).stacked()
    torch.testing.assert_close(OnnxExitRunner(tmp_path).all_exits(x), eager, atol=ATOL,
                               rtol=1e-4)


def test_missing_onnxruntime_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes ``import`` fail
    with pytest.raises(ImportError, match=r"exitwise\[export\]"):
        OnnxExitRunner(tmp_path)


def test_sdn_export_windows_equal_adaptive_pooling():
    # what an exported sdn head computes: PyTorch's adaptive windows, one slice per cell
    import torch.nn.functional as F

    from exitwise.heads.sdn import _window_pools

    for h, w in [(14, 14), (7, 9), (8, 8), (3, 5), (1, 1)]:
        x = torch.randn(2, 3, h, w)
        peak, mean = _window_pools(x, 4)
        assert torch.equal(peak, F.adaptive_max_pool2d(x, 4))
        torch.testing.assert_close(mean, F.adaptive_avg_pool2d(x, 4))


def test_runner_checks_labels_as_the_eager_executor(exported):
    model, _, runner = exported
    x = images(4)
    oracle = ew.get_policy("oracle")
    labels = [0, 1, 2, 3]  # a list, as the eager executor takes it
    eager = model.early_exit(oracle, labels=torch.tensor(labels), pixel_values=x)
    assert torch.equal(runner.run(x, oracle, labels=labels).exit_index, eager.exit_index)
    with pytest.raises(InputError, match=r"labels must be in \[0, 4\)"):
        runner.run(x, oracle, labels=[0, 1, 2, 9])


def test_a_regression_model_runs_exported_as_eagerly(tmp_path):
    # the runner let confidence decide on a value (every row left at exit 0) and predicted
    # the arg-max of one output (always 0)
    from exitwise.errors import ConfigError

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]
    model = ew.attach_exits(ew.SequentialBackbone(blocks, example=torch.randn(1, 6)),
                            ew.ExitConfig(layers="all", head="linear", num_labels=1)).eval()
    export_segments(model, tmp_path, torch.randn(2, 6))
    runner = OnnxExitRunner(tmp_path)
    x = torch.randn(5, 6)
    with pytest.raises(ConfigError, match="regression"):
        runner.run(x, ew.get_policy("confidence"))
    patience = ew.get_policy("patience", patience=1, tolerance=0.05)
    got, eager = runner.run(x, patience), model.early_exit(patience, inputs=x)
    assert torch.equal(got.exit_index, eager.exit_index)
    torch.testing.assert_close(got.predictions, eager.predictions, atol=ATOL, rtol=0)


def test_a_bfloat16_model_is_refused_before_exporting(tmp_path):
    model = tiny_cnn().to(torch.bfloat16)
    with pytest.raises(InputError, match=r"model.float\(\)"):
        export_segments(model, tmp_path / "bf16", torch.randn(2, 3, 8, 8))
    with pytest.raises(InputError, match="float32"):
        export_segments(tiny_cnn(), tmp_path / "ex", torch.randn(2, 3, 8, 8).bfloat16())
    assert not (tmp_path / "bf16").exists()

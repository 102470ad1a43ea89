"""The packed few-row product (exitwise.backbones.packed) and its place among the measured
kernel choices (exitwise.backbones.kernel_tuner)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exitwise.backbones import kernel_tuner as KT
from exitwise.backbones import packed as P
from exitwise.backbones.kernels import KernelTuner, few_row_kernels
from exitwise.errors import ConfigError

needs_onednn = pytest.mark.skipif(not P.packed_available(), reason="no oneDNN in this build")


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 16), (1, 2, 16), (2, 4, 16)])
def test_packed_linear_equals_f_linear_up_to_round_off(shape):
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 16), torch.randn(24), torch.randn(*shape)
    got = P.packed_linear(x, w, b)
    assert got.shape == (*shape[:-1], 24)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(P.packed_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_copy_follows_in_place_changes_and_goes_with_its_weight():
    w, x = torch.randn(8, 4), torch.randn(2, 4)
    P.packed_linear(x, w)
    assert id(w) in P._packed
    with torch.no_grad():
        w.mul_(2.0)  # an in-place update (an optimizer step): the copy is rebuilt
    torch.testing.assert_close(P.packed_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    key = id(w)
    del w
    gc.collect()
    assert key not in P._packed  # no copy outlives its weight
    v = torch.randn(8, 4)
    P.packed_linear(x, v)
    P.forget_packed([v])
    assert id(v) not in P._packed


def test_only_float32_cpu_matrices_are_packed():
    assert not P.can_pack(torch.randn(4, 4, dtype=torch.float64))
    assert not P.can_pack(torch.randn(4))
    assert P.can_pack(torch.randn(4, 4)) == P.packed_available()


def test_the_alternative_with_the_lowest_ratio_is_chosen(monkeypatch):
    """Paired times, stock 10 ms each: streaming at 9 ms (ratio 0.9) and packed at 6 ms
    (0.6) -> packed; with packing too slow (1.2) -> streaming; both above 1 - margin ->
    stock. The packed copies of a shape that does not take the packed path are freed."""
    calls: list[str] = []

    def fake_times(first, second, repeats):
        cells = [c.cell_contents for c in second.__closure__]  # the kernel timed vs stock
        name = "packed" if P.packed_linear in cells else "streaming"
        calls.append(name)
        return [0.010] * 3, [0.010 * ratios[name]] * 3

    monkeypatch.setattr(KT, "paired_times", fake_times)
    monkeypatch.setattr(KT, "can_pack", lambda w: True)
    freed: list[int] = []
    monkeypatch.setattr(KT, "forget_packed", lambda ws: freed.extend(id(w) for w in ws))
    weights = [torch.randn(6, 4) for _ in range(2)]
    for ratios, kind, stream in (({"streaming": 0.9, "packed": 0.6}, "packed", True),
                                 ({"streaming": 0.9, "packed": 1.2}, "streaming", True),
                                 ({"streaming": 0.97, "packed": 1.3}, "streaming", False)):
        calls.clear()
        freed.clear()
        d = KernelTuner(None, repeats=3)._measure(weights, 2)
        assert calls == ["streaming", "packed"]  # both measured against stock
        assert (d.kind, d.stream) == (kind, stream)
        assert d.ratio == pytest.approx(ratios[kind])
        assert d.stock_ms == pytest.approx(10.0)
        assert d.streaming_ms == pytest.approx(10.0 * ratios[kind])
        assert freed == ([] if kind == "packed" else [id(w) for w in weights])
    calls.clear()
    only = KernelTuner(None, repeats=3, alternatives=("streaming",))._measure(weights, 2)
    assert calls == ["streaming"] and only.kind == "streaming"
    with pytest.raises(ConfigError):
        KernelTuner(None, alternatives=("magic",))


@needs_onednn
def test_forced_packing_reroutes_and_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        want = model(x)
        with few_row_kernels(model, kernels="packed") as scope:
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert scope.streamed == 2
    assert all(c == {"packed": 1} for c in scope.calls.values())


def test_entries_measured_before_packing_existed_are_measured_again(tmp_path):
    import json

    path = tmp_path / "kernels.json"
    machine = KT.machine_key()
    old = {"stream": True, "ratio": 0.5, "stock_ms": 1.0, "streaming_ms": 0.5}  # no "kind"
    path.write_text(json.dumps({"machines": {machine: {"float32:6x4:n1:r1": old}}}))
    tuner = KernelTuner(path)
    assert tuner.decisions() == {}

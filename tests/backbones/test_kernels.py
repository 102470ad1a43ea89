"""Few-row streaming products and their measured choice (exitwise.backbones.kernels)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exitwise.backbones import kernel_tuner as KT
from exitwise.backbones import kernels as K
from exitwise.backbones.kernels import (
    KernelDecision,
    KernelTuner,
    autotune,
    few_row_kernels,
    paired_choice,
    resolve_kernels,
    streaming_linear,
)
from exitwise.errors import ConfigError


class FixedTuner(KernelTuner):
    """A tuner whose 'measurement' returns a fixed choice and counts how often it ran."""

    def __init__(self, stream: bool, path=None) -> None:
        super().__init__(path)
        self.stream = stream
        self.measured: list[str] = []

    def _measure(self, weights, rows):
        self.measured.append(K.shape_key(weights, rows))
        return KernelDecision(self.stream, 0.5 if self.stream else 1.5, 1.0, 1.0)


def snapshot(model: nn.Module) -> list:
    """Everything of the modules a kernel switch could change: class, instance dict keys,
    forward, hooks, and the parameters' identity."""
    return [
        (name, type(m), sorted(m.__dict__), m.forward.__func__, dict(m._forward_hooks),
         dict(m._forward_pre_hooks), [id(p) for p in m.parameters(recurse=False)])
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 4), (5,), (3, 3), (1, 12)])
def test_streaming_product_equals_f_linear(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape, 24)
    with torch.inference_mode():
        want = lin(x)
        got = streaming_linear(x, lin.weight, lin.bias)
        with few_row_kernels(lin, kernels="streaming") as scope:
            via_mode = lin(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = x.numel() // 24
    if rows <= K.DEFAULT_MAX_ROWS:
        assert torch.equal(via_mode, got) and scope.streamed == 1
    else:
        assert torch.equal(via_mode, want) and scope.streamed == 0


def test_odd_row_counts_are_padded_to_an_even_product(monkeypatch):
    """1 -> 2 and 3 -> 4 columns reach torch.mm; the pad's column never reaches the output."""
    torch.manual_seed(2)
    lin = nn.Linear(16, 32)
    widths: list[int] = []
    real_mm = torch.mm

    def spy(a, b):
        widths.append(b.shape[1])
        return real_mm(a, b)

    with torch.inference_mode():
        for rows in (1, 2, 3, 4):
            x = torch.randn(1, rows, 16)
            want = lin(x)
            monkeypatch.setattr(torch, "mm", spy)
            got = streaming_linear(x, lin.weight, lin.bias)
            monkeypatch.setattr(torch, "mm", real_mm)
            assert got.shape == (1, rows, 32)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert widths == [2, 2, 4, 4]


def test_more_rows_than_max_rows_autograd_and_stock_keep_the_stock_kernel_bit_for_bit():
    torch.manual_seed(1)
    lin = nn.Linear(16, 32)
    with torch.inference_mode():
        for rows in (9, 20):
            x = torch.randn(rows, 16)
            want = lin(x)
            with few_row_kernels(lin, kernels="streaming", max_rows=8) as scope:
                assert torch.equal(lin(x), want)
            assert scope.streamed == 0
        x = torch.randn(2, 16)
        want = lin(x)
        with few_row_kernels(lin, kernels="stock") as scope:
            assert torch.equal(lin(x), want)
        assert scope.weights == 0 and scope.calls == {}
    x = torch.randn(3, 16, requires_grad=True)
    with few_row_kernels(lin, kernels="streaming") as scope:  # training: autograd path
        lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None and scope.streamed == 0


def test_only_the_scoped_weights_are_rerouted_and_the_model_is_never_changed():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Sequential(nn.Linear(4, 2)))
    outside = nn.Linear(4, 4)
    before = snapshot(model)
    x = torch.randn(1, 4)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="boom"):
            with few_row_kernels(model, model[0], kernels="streaming") as scope:
                model(x)
                outside(x)  # not under the given modules: stock, not counted
                assert snapshot(model) == before  # nothing is swapped, even inside
                raise RuntimeError("boom")
    assert snapshot(model) == before
    # a weight reached twice counts once; subclasses of nn.Linear are products too
    assert scope.weights == 3 and scope.streamed == 3
    assert set(scope.calls) == {"float32:4x4:n2:r1", "float32:2x4:n1:r1"}


def test_auto_streams_exactly_where_the_measurement_says(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    x = torch.randn(2, 8)
    with torch.inference_mode():
        want = model(x)
        for stream in (False, True):
            tuner = FixedTuner(stream)
            with few_row_kernels(model, kernels="auto", tuner=tuner) as scope:
                got = model(x)
                model(x)
            # one measurement per (shape, rows), reused by every weight of the shape
            assert len(tuner.measured) == len(set(tuner.measured))
            if stream:
                assert {"float32:3x8:n1:r2", "float32:8x8:n2:r2"} <= set(tuner.measured)
                assert scope.streamed == 6
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:
                # measured slower at every row count 1..8 (all measured before the first
                # product): nothing is rerouted at all, the stock kernel, bit for bit
                assert sorted(tuner.measured) == sorted(
                    f"float32:{s}:r{r}" for s in ("3x8:n1", "8x8:n2") for r in range(1, 9))
                assert scope.streamed == 0 and scope.calls == {} and torch.equal(got, want)


def test_measurements_are_kept_per_machine_and_reused(tmp_path, monkeypatch, caplog):
    path = tmp_path / "kernels.json"
    weights = [torch.randn(6, 5) for _ in range(2)]
    first = FixedTuner(True, path)
    with caplog.at_level("WARNING", logger=KT.__name__):
        assert first.decide(weights, 1).stream and first.measured == ["float32:6x5:n2:r1"]
        first.decide(weights, 2)
    # a first generate() pauses to measure: said once, visibly (a debug line before) ...
    notice = (f"exitwise: timing few-row kernels for this machine and model once (kept in "
              f"{path}; kernels='stock' skips it)")
    assert [r.getMessage() for r in caplog.records] == [notice]
    caplog.clear()
    # ... and once more for another model's shapes (what a decoder asks about first)
    with caplog.at_level("WARNING", logger=KT.__name__):
        first.any_stream([[torch.randn(7, 5)]], max_rows=2)
    assert [r.getMessage() for r in caplog.records] == [notice]
    caplog.clear()
    again = FixedTuner(False, path)  # a new process: reads the file, measures nothing
    assert again.decide(weights, 1).stream and again.measured == []
    assert not caplog.records  # nothing measured, nothing said
    data = json.loads(path.read_text())
    (machine,) = data["machines"]
    assert machine == KT.machine_key() and data["machines"][machine]["float32:6x5:n2:r1"][
        "stream"] is True
    monkeypatch.setattr(KT, "machine_key", lambda: "another CPU | torch x | 2 threads")
    other = FixedTuner(False, path)  # another machine never reuses this one's timings
    assert not other.decide(weights, 1).stream and other.measured == ["float32:6x5:n2:r1"]
    assert len(json.loads(path.read_text())["machines"]) == 2
    other.clear()
    assert list(json.loads(path.read_text())["machines"]) == [machine]
    path.write_text("{not json")  # a damaged file is measured again, not fatal
    damaged = FixedTuner(True, path)
    assert damaged.decide(weights, 1).stream and len(damaged.measured) == 1


def test_the_auto_rule_on_hand_computed_times():
    # paired ratios 0.9, 1.2, 0.8: median 0.9
    d = paired_choice([10.0, 10.0, 10.0], [9.0, 12.0, 8.0], margin=0.05)
    assert d.stream and d.ratio == pytest.approx(0.9)
    assert d.stock_ms == pytest.approx(10_000.0) and d.streaming_ms == pytest.approx(9_000.0)
    assert not paired_choice([10.0, 10.0, 10.0], [9.0, 12.0, 8.0], margin=0.15).stream
    assert not paired_choice([1.0], [1.0], margin=0.0).stream  # a tie keeps stock
    with pytest.raises(ConfigError):
        paired_choice([1.0], [], margin=0.05)


def test_a_real_measurement_gives_a_consistent_decision():
    tuner = KernelTuner(None, margin=0.05, repeats=3)
    weights = [torch.randn(64, 32) for _ in range(3)]
    d = tuner.decide(weights, 2)
    assert d.stock_ms > 0 and d.streaming_ms > 0 and d.ratio > 0
    assert d.stream == (d.ratio < 0.95)
    assert tuner.decisions() == {"float32:64x32:n3:r2": d}
    got = autotune(nn.Sequential(nn.Linear(32, 64)), rows=(2,), tuner=tuner)
    assert list(got) == ["float32:64x32:n1:r2"]


def test_a_second_thread_is_never_rerouted():
    torch.manual_seed(4)
    lin = nn.Linear(16, 16)
    x = torch.randn(1, 16)
    with torch.inference_mode():
        want = lin(x)
    inside, other_done = threading.Event(), threading.Event()
    results: dict[str, torch.Tensor] = {}

    def other():
        inside.wait()
        with torch.inference_mode():
            results["other"] = lin(x)
        other_done.set()

    t = threading.Thread(target=other)
    t.start()
    with torch.inference_mode(), few_row_kernels(lin, kernels="streaming") as scope:
        inside.set()
        other_done.wait(10)
        lin(x)
    t.join()
    assert torch.equal(results["other"], want) and scope.streamed == 1


def test_choice_by_argument_and_environment(monkeypatch):
    monkeypatch.delenv("EXITWISE_KERNELS", raising=False)
    assert resolve_kernels(None) == "auto"
    monkeypatch.setenv("EXITWISE_KERNELS", "Stock")
    assert resolve_kernels(None) == "stock"
    assert resolve_kernels("streaming") == "streaming"  # an argument wins
    monkeypatch.setenv("EXITWISE_KERNELS", "fast")
    with pytest.raises(ConfigError, match="EXITWISE_KERNELS"):
        resolve_kernels(None)
    with pytest.raises(ConfigError, match="kernels"):
        resolve_kernels("fast")
    lin = nn.Linear(4, 4)
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="max_rows"):
            with few_row_kernels(lin, kernels="streaming", max_rows=bad):
                pass
    with pytest.raises(ConfigError, match="margin"):
        KernelTuner(None, margin=1.0)
    with pytest.raises(ConfigError, match="repeats"):
        KernelTuner(None, repeats=0)


def test_f_linear_called_directly_on_a_scoped_weight_is_rerouted_too():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.inference_mode(), few_row_kernels(lin, kernels="streaming") as scope:
        got = F.linear(x, lin.weight, bias=lin.bias)
    assert scope.streamed == 1
    torch.testing.assert_close(got, lin(x).detach(), rtol=1e-5, atol=1e-5)


def test_measuring_leaves_the_global_random_stream_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    KernelTuner(None, repeats=1).decide([torch.ones(4, 4)], 1)
    assert torch.equal(torch.rand(3), expected)


# -- the whole-pass check and per-call rerouting -------------------------------------------
class Probe:
    """A stack probe over ``model`` whose 'time' is 2.0 when any of its products streamed and
    ``slow_rows`` includes the row count, else 1.0 (and 0.5 when streamed at other counts)."""

    key = "probe-model"

    def __init__(self, model: nn.Module, slow_rows=()) -> None:
        self.model = model
        self.slow_rows = set(slow_rows)
        self.calls: list[int] = []

    def __call__(self, rows: int) -> float:
        self.calls.append(rows)
        before = STREAMED[0]
        with torch.inference_mode():
            self.model(torch.randn(rows, 8))
        if STREAMED[0] == before:
            return 1.0
        return 2.0 if rows in self.slow_rows else 0.5


STREAMED = [0]


@pytest.fixture
def counted_streaming(monkeypatch):
    real = K.streaming_linear

    def counting(x, w, b=None):
        STREAMED[0] += 1
        return real(x, w, b)

    monkeypatch.setattr(K, "streaming_linear", counting)
    STREAMED[0] = 0
    return STREAMED


def test_the_whole_pass_check_keeps_rerouting_only_where_the_pass_is_faster(
        tmp_path, counted_streaming):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    probe = Probe(model, slow_rows={1, 3})
    tuner = FixedTuner(True, tmp_path / "kernels.json")  # every shape streams alone
    with torch.inference_mode(), few_row_kernels(
            model, kernels="auto", tuner=tuner, probe=probe, max_rows=4) as scope:
        assert scope.rows == (2, 4)  # the pass rerouted measured 2.0 vs 1.0 at rows 1 and 3
        n = STREAMED[0]
        model(torch.randn(1, 8))
        model(torch.randn(3, 8))
        assert STREAMED[0] == n  # rows 1 and 3 kept the stock kernel
        model(torch.randn(2, 8))
        assert STREAMED[0] == n + 2
    assert scope.streamed == 2 and set(scope.calls) == {"float32:8x8:n2:r2"}
    # each count measured once (warm-up + pairs), stock and rerouted alternating
    assert sorted(set(probe.calls)) == [1, 2, 3, 4]
    data = json.loads((tmp_path / "kernels.json").read_text())
    kept = data["machines"][KT.machine_key()]
    assert {k: v["stream"] for k, v in kept.items() if k.startswith("stack:")} == {
        "stack:probe-model:r1": False, "stack:probe-model:r2": True,
        "stack:probe-model:r3": False, "stack:probe-model:r4": True}
    assert kept["stack:probe-model:r1"]["ratio"] == pytest.approx(2.0)
    # a new process on this machine reuses the verdicts: the probe does not run again
    again = Probe(model, slow_rows={1, 2, 3, 4})
    with few_row_kernels(model, kernels="auto", tuner=FixedTuner(True, tmp_path / "kernels.json"),
                         probe=again, max_rows=4) as scope:
        assert scope.rows == (2, 4) and again.calls == []


def test_when_no_row_count_pays_nothing_is_rerouted(counted_streaming):
    model = nn.Sequential(nn.Linear(8, 8))
    probe = Probe(model, slow_rows=range(1, 9))
    with torch.inference_mode(), few_row_kernels(
            model, kernels="auto", tuner=FixedTuner(True), probe=probe) as scope:
        want = F.linear(torch.ones(1, 8), model[0].weight, model[0].bias)
        n = STREAMED[0]
        assert torch.equal(model(torch.ones(1, 8)), want)
    assert scope.rows == () and scope.calls == {} and STREAMED[0] == n
    # and when no shape streams alone the probe never runs
    probe = Probe(model)
    with few_row_kernels(model, kernels="auto", tuner=FixedTuner(False), probe=probe) as scope:
        pass
    assert probe.calls == [] and scope.rows is None


class RoutedProbe(Probe):
    """A probe whose pass goes through ``routed`` (as exitwise's decoders do)."""

    def __call__(self, rows: int) -> float:
        self.calls.append(rows)
        before = STREAMED[0]
        x = torch.randn(rows, 8)
        with torch.inference_mode():
            K.routed(self.model, x)(x)
        if STREAMED[0] == before:
            return 1.0
        return 2.0 if rows in self.slow_rows else 0.5


def test_per_call_reroutes_routed_passes_of_allowed_rows_and_single_sites_at_any(
        counted_streaming, tmp_path):
    block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    head = nn.Linear(8, 8)
    probe = RoutedProbe(block, slow_rows={1})
    x1, x2 = torch.randn(1, 1, 8), torch.randn(1, 2, 8)
    with torch.inference_mode():
        assert K.routed(block, x2) is block  # no scope: the module itself
        with K.rerouted(x2):
            head(x2)
        assert STREAMED[0] == 0
        tuner = FixedTuner(True, tmp_path / "kernels.json")
        with few_row_kernels(block, head, kernels="auto", tuner=tuner, probe=probe,
                             per_call=True, max_rows=2) as scope:
            assert scope.rows == (2,)  # the routed one-row pass measured slower
            n = STREAMED[0]
            block(x2)
            head(x1)  # called directly: the stock kernel, nothing intercepted
            assert K.routed(block, x1) is block  # one row does not pay for a pass
            assert STREAMED[0] == n
            view = K.routed(block, x2)
            assert view is not block and K.routed(block, x2) is view  # one view per scope
            got = view(x2)
            assert STREAMED[0] == n + 2
            # a single-product site at one row: its shape alone decides
            K.routed(head, x1, single=True)(x1)
            with K.rerouted(x1):  # heads' code: intercepted, entered once when nested
                head(x1)
                with K.rerouted(x1):
                    head(x1)
            assert STREAMED[0] == n + 5
        assert K.routed(block, x2) is block  # the scope is over
    assert scope.streamed == 5
    want = block(x2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kept = json.loads((tmp_path / "kernels.json").read_text())["machines"][KT.machine_key()]
    assert {k: v["stream"] for k, v in kept.items() if k.startswith("stack:")} == {
        "stack:views:probe-model:r1": False, "stack:views:probe-model:r2": True}


def test_a_view_shares_the_parameters_and_leaves_the_module_alone():
    from exitwise.backbones.views import FewRowLinear, few_row_view

    inner = nn.Linear(4, 3, bias=False)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(inner, nn.Tanh()), nn.LayerNorm(3))
    before = [type(m) for m in model.modules()]
    calls = []

    def choose(x, w):
        calls.append(tuple(w.shape))
        return None  # stock

    view = few_row_view(model, lambda lin: lin is inner, choose)
    assert [type(m) for m in model.modules()] == before  # the original is untouched
    seen = []
    inner.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert view is not model and view[0] is model[0] and view[2] is model[2]
    assert isinstance(view[1][0], FewRowLinear) and view[1][1] is model[1][1]
    assert view[1][0].weight is inner.weight and view[1][0].bias is None
    x = torch.randn(2, 4)
    torch.testing.assert_close(view(x), model(x), rtol=0, atol=0)
    assert calls == [(3, 4)] and seen == [(2, 3), (2, 3)]  # the user's hook runs on the view
    with torch.no_grad():
        inner.weight.mul_(2)  # in-place changes show through
    torch.testing.assert_close(view(x), model(x), rtol=0, atol=0)
    assert few_row_view(model, lambda lin: False, choose) is model  # nothing scoped: itself


def test_paired_times_alternate_and_shorten_long_measurements():
    order: list[str] = []

    def a() -> float:
        order.append("a")
        return 0.01

    def b() -> float:
        order.append("b")
        return 0.02

    x, y = K.paired_times(a, b, 4)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"] and len(x) == len(y) == 4
    order.clear()
    x, _ = K.paired_times(lambda: 0.3, b, 9)  # a warm-up pair over 0.2 s: 4 pairs, not 9
    assert len(x) == 4

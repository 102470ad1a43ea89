"""Few-row streaming linears (exitwise.backbones.kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitwise.backbones.kernels import StreamingLinear, streaming_linears


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 4), (5,), (3, 3), (1, 12)])
def test_streaming_linear_equals_nn_linear(bias, shape):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape, 24)
    with torch.inference_mode():
        want = lin(x)
        with streaming_linears(lin) as n:
            assert n == 1 and type(lin) is StreamingLinear
            got = lin(x)
    assert type(lin) is nn.Linear
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_more_rows_than_max_rows_keep_the_stock_kernel_bit_for_bit():
    torch.manual_seed(1)
    lin = nn.Linear(16, 32)
    with torch.inference_mode():
        for rows in (9, 20):
            x = torch.randn(rows, 16)
            want = lin(x)
            with streaming_linears(lin, max_rows=8):
                assert torch.equal(lin(x), want)


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
            with streaming_linears(lin):
                monkeypatch.setattr(torch, "mm", spy)
                got = lin(x)
                monkeypatch.setattr(torch, "mm", real_mm)
            assert got.shape == (1, rows, 32) and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert widths == [2, 2, 4, 4]


def test_only_exact_linears_switch_and_all_come_back_after_an_error():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), nn.Sequential(nn.Linear(4, 2)))
    shared = model[0]
    with pytest.raises(RuntimeError, match="boom"):
        with streaming_linears(model, shared) as n:  # a module reached twice counts once
            assert n == 2
            assert type(model[1]) is Custom
            raise RuntimeError("boom")
    assert [type(m) for m in (model[0], model[1], model[2][0])] == [nn.Linear, Custom, nn.Linear]


def test_training_keeps_the_autograd_path():
    lin = nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    with streaming_linears(lin):
        lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_disabled_and_bad_arguments():
    lin = nn.Linear(4, 4)
    with streaming_linears(lin, enabled=False) as n:
        assert n == 0 and type(lin) is nn.Linear
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="max_rows"):
            with streaming_linears(lin, max_rows=bad):
                pass
